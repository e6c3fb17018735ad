"""Figures drawn without pyplot, so plotting never switches the backend of a caller's notebook or GUI."""

from ._optional import missing_extra


def subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
    """(figure, axes) like `pyplot.subplots`, on a `matplotlib.figure.Figure` of its own (save it with savefig)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise missing_extra("matplotlib", "train") from error

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols, **kwargs)
