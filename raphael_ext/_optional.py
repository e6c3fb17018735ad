"""Dependencies of training and evaluation that `pip install raphael_ext` leaves out (the [train] and [eval] extras)."""


def missing_extra(package: str, extra: str) -> ImportError:
    """The error to raise when `package` of the `extra` extra is not installed: it names the extra and the package."""
    return ImportError(f"{package} is not installed; it comes with raphael_ext's {extra} extra: "
                       f"pip install 'raphael_ext[{extra}]' (or pip install {package})")
