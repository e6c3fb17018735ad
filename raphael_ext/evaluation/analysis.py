"""The paper's analyses of its experts, in miniature: does the path a concept's token takes through the space experts
name the concept (paper §3.1: a gradient-boosted classifier reads adjectives from their paths at 93 %), and how do the
time experts share out the sampling steps (paper Fig. 9: in block 1 the first expert takes the first 59 % of steps).

Concepts come in families (`SHAPES_FAMILIES` on the shapes task, or a user's word lists, `load_word_lists`); each
concept has prompts, and in each prompt one traced word whose token's path is recorded (`ConceptPrompt`):

- "color": the six COLORS; "shape": the three SHAPES; the traced word is the colour or shape word itself.
- "count": one, two or three objects. Training captions have no number words ("a red circle to the left of a blue
  square"), so the traced token is "<end_of_text>": the text encoder is causal (CLIP's), and that token is the only
  one that has read the whole prompt.
- "relation": the four RELATIONS, traced by their distinctive word ("left", "right", "above", "below").

The shapes prompts are ShapesDataset-style captions of random scenes (the vocabulary the model was trained on), with
the concept's object at a random place in the caption. With a causal text encoder a token's path depends only on the
words before it, so a colour named first always takes the same path; the random order gives each concept its variety.

`analyze` runs both analyses and writes analysis.json with the pictures.
"""

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .._optional import missing_extra
from ..pipelines.paths import DiffusionPaths
from ..pipelines.pipeline_raphael import RaphaelPipeline
from ..plotting import subplots
from ..training.data import COLORS, RELATIONS, SHAPES, ShapeSpec, caption, relation, sample_scene

try:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
except ImportError as error:
    raise missing_extra("scikit-learn", "eval") from error


class ConceptPrompt(NamedTuple):
    """A prompt and the word whose token's path is traced in it (its first occurrence; a word the tokenizer splits
    into BPE pieces is traced by its first piece)."""

    prompt: str
    word: str


ConceptPrompts = Dict[str, Dict[str, List[ConceptPrompt]]]  # family -> concept -> prompts

SHAPES_FAMILIES = ("color", "shape", "count", "relation")
END_OF_TEXT = "<end_of_text>"
COUNT_WORDS = ("one", "two", "three")  # the count family's concept names (objects in the scene)
RELATION_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def _scene_with(family: str, concept: str, rng: random.Random) -> List[ShapeSpec]:
    """A random scene showing `concept` of `family` (rejection sampling where sample_scene has no direct control)."""
    if family == "color":
        objects = sample_scene(rng, first_color=concept)
        rng.shuffle(objects)  # the colour anywhere in the caption, not only first
        return objects
    if family == "shape":
        objects = sample_scene(rng)
        place = rng.randrange(len(objects))
        objects[place] = replace(objects[place], shape=concept)
        return objects
    while True:
        objects = sample_scene(rng)
        if family == "count" and len(objects) == COUNT_WORDS.index(concept) + 1:
            return objects
        if (family == "relation" and len(objects) >= 2
                and RELATION_WORDS[relation(objects[0], objects[1])] == concept):
            return objects


def _traced_word(family: str, concept: str) -> str:
    return END_OF_TEXT if family == "count" else concept


def shapes_concept_prompts(families: Sequence[str] = SHAPES_FAMILIES, samples_per_concept: int = 40,
                           seed: int = 0) -> ConceptPrompts:
    """`samples_per_concept` ShapesDataset-style captions for every concept of the shapes families (module docstring),
    the same for the same seed."""
    concepts = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNT_WORDS,
                "relation": tuple(RELATION_WORDS[r] for r in RELATIONS)}
    unknown = sorted(set(families) - set(concepts))
    if unknown:
        raise ValueError(f"shapes_concept_prompts: unknown families {unknown}; choose from {list(SHAPES_FAMILIES)}")
    prompts: ConceptPrompts = {}
    for family in families:
        prompts[family] = {}
        for concept in concepts[family]:
            rng = random.Random(f"analysis:{seed}:{family}:{concept}")
            prompts[family][concept] = [ConceptPrompt(caption(_scene_with(family, concept, rng)),
                                                      _traced_word(family, concept))
                                        for _ in range(samples_per_concept)]
    return prompts


def load_word_lists(path: Union[str, Path]) -> ConceptPrompts:
    """A user's concept families from a JSON file {"family": {"concept": ["prompt", ...]}}. A prompt may hold
    "{concept}", replaced by the concept; the traced word is the concept itself, so a concept is named by one word
    (for a phrase, name it by its distinctive word and write the phrase in the prompts: {"left": ["a cat to the left
    of a dog"]}). Every prompt is one sample; a concept needs at least as many prompts as the classifier has folds."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"load_word_lists: cannot read {path}: {error}") from error
    example = '{"family": {"concept": ["a prompt with {concept}", ...]}}'
    if not isinstance(data, dict) or not all(isinstance(concepts, dict) for concepts in data.values()):
        raise ValueError(f"load_word_lists: {path} must hold {example}")
    families: ConceptPrompts = {}
    for family, concepts in data.items():
        families[family] = {}
        for concept, templates in concepts.items():
            if len(concept.split()) != 1:
                raise ValueError(f"load_word_lists: concept {concept!r} of {family!r} must be one word (the traced "
                                 "word); write the phrase in the prompts")
            if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
                raise ValueError(f"load_word_lists: {family}/{concept} needs a non-empty list of prompts ({example})")
            prompts = [template.replace("{concept}", concept) for template in templates]
            missing = [p for p in prompts if concept.lower() not in p.lower()]
            if missing:
                raise ValueError(f"load_word_lists: {family}/{concept}: prompt {missing[0]!r} lacks the word")
            families[family][concept] = [ConceptPrompt(p, concept) for p in prompts]
    return families


def find_token(tokens: Sequence[str], word: str) -> int:
    """Index of the first token that starts `word` (case-insensitive; "</w>" stripped), following the word over the
    BPE pieces it was split into; `tokens` as DiffusionPaths.tokens holds them."""
    pieces = [t.replace("</w>", "").strip().lower() for t in tokens]
    target = word.lower()
    for start in range(len(pieces)):
        spelled = ""
        for piece in pieces[start:]:
            spelled += piece
            if not target.startswith(spelled) or spelled == target:
                break
        if spelled == target:
            return start
    raise ValueError(f"find_token: {word!r} is not among the tokens {list(tokens)} (truncated prompt?)")


def has_space_moe(pipe: RaphaelPipeline) -> bool:
    return bool(pipe.unet.config.use_space_moe and pipe.unet.config.space_experts > 0)


def has_time_moe(pipe: RaphaelPipeline) -> bool:
    return bool(pipe.unet.config.use_time_moe and pipe.unet.config.time_experts > 0)


def record_concept_paths(pipe: RaphaelPipeline, prompts_by_concept: Dict[str, List[ConceptPrompt]], steps: int = 1,
                         seed: int = 0, batch: int = 32) -> Tuple[np.ndarray, List[str]]:
    """(paths int64 [samples, blocks], concept labels): for each prompt, the space expert its traced word's token takes
    in every transformer block at the last sampling step. RAPHAEL's space gate reads only the text token's state
    (SpaceMoE.gate(text)), so a token's path is the same at every step and under any guidance: one unguided step
    (the default) records it; raise `steps` for a model whose gate also sees the image."""
    if not has_space_moe(pipe):
        raise ValueError("record_concept_paths: the pipeline's U-Net has no space-MoE, so its tokens take no paths")
    samples = [(concept, item) for concept, items in prompts_by_concept.items() for item in items]
    pipe.set_progress_bar_config(disable=True)
    paths, labels = [], []
    for start in tqdm(range(0, len(samples), batch), desc="diffusion paths", unit="batch"):
        chunk = samples[start : start + batch]
        recorded = pipe([item.prompt for _, item in chunk], num_inference_steps=steps, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(seed + start), output_type="latent",
                        record_paths=True).paths
        routes = torch.stack([r for r in recorded.space_routes[-1] if r is not None], dim=-1)  # [B, N_y, blocks]
        for row, (concept, item) in enumerate(chunk):
            paths.append(routes[row, find_token(recorded.tokens[row], item.word)].numpy())
            labels.append(concept)
    return np.stack(paths), labels


def route_classifier(features: np.ndarray, labels: Sequence[str], folds: int = 5, seed: int = 0) -> Dict[str, object]:
    """How well a concept's path names it: scikit-learn's gradient-boosted trees (HistGradientBoostingClassifier; the
    paper used XGBoost: the same method, and no optional package decides the result), scored by stratified k-fold
    cross-validation shuffled with `seed` (the same seed, the same folds and result). Expert ids name experts, their
    order means nothing, so they are one-hot encoded and each split asks "did block b choose expert e"
    (HistGradientBoosting's own categorical splits ignore a category seen fewer than 10 times, which leaves tens of
    paths per concept mostly unsplit).

    Returns accuracy (mean over folds) and accuracy_std (over folds), chance (the majority class's frequency: what
    always answering the commonest concept scores), samples, classes (sorted), folds, and the confusion matrix summed
    over the folds' test sets (rows: true concept, columns: predicted, in `classes` order)."""
    features, labels = np.asarray(features), np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"route_classifier: needs at least two concepts, got {list(classes)}")
    if counts.min() < folds:
        raise ValueError(f"route_classifier: concept {classes[counts.argmin()]!r} has {counts.min()} samples, fewer "
                         f"than the {folds} folds")
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, labels)
    accuracies, confusion = [], np.zeros((len(classes), len(classes)), dtype=np.int64)
    for train, test in splits:
        # Small leaves: a family has tens of samples per concept, fewer than the default leaf size of 20.
        model = make_pipeline(OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                              HistGradientBoostingClassifier(min_samples_leaf=3, random_state=seed))
        predicted = model.fit(features[train], labels[train]).predict(features[test])
        accuracies.append(float(np.mean(predicted == labels[test])))
        confusion += confusion_matrix(labels[test], predicted, labels=classes)
    return {"accuracy": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies)),
            "chance": float(counts.max() / counts.sum()), "samples": int(len(labels)), "classes": classes.tolist(),
            "folds": folds, "confusion": confusion.tolist()}


def time_expert_shares(paths: Union[DiffusionPaths, Sequence[DiffusionPaths]]) -> Dict[str, object]:
    """How the time experts share out the sampling steps, per transformer block, over every prompt of the recorded
    runs (which need the same number of steps):

    - shares: {expert: fraction of (prompt, step) pairs that chose it};
    - first_expert: the expert most prompts chose at the first (noisiest) step;
    - handover: the fraction of the steps, counted from the first, before the first step's expert is first replaced,
      averaged over prompts (1.0: it never is). Paper Fig. 9's "the first expert takes the first 59 % of the DDIM
      steps" is a handover of 0.59. Block 0 choosing expert 2 at 6 of 10 steps, then expert 1, gives shares
      {2: 0.6, 1: 0.4} and handover 0.6; choosing 2, 1, 2 for 3, 3, 4 steps gives share 0.7 for 2 but handover 0.3;
    - experts_by_step: the expert most prompts chose at each step.

    Blocks without a time-MoE are left out. Returns {"steps", "timesteps", "prompts", "blocks": [...]}."""
    runs = [paths] if isinstance(paths, DiffusionPaths) else list(paths)
    steps = len(runs[0].time_routes)
    if steps == 0 or any(len(run.time_routes) != steps for run in runs):
        raise ValueError("time_expert_shares: the runs need the same, non-zero number of recorded steps")
    blocks = []
    for block in range(len(runs[0].time_routes[0])):
        if runs[0].time_routes[0][block] is None:
            continue
        table = torch.cat([torch.stack([step[block] for step in run.time_routes], dim=1) for run in runs])  # [P, S]
        experts, counts = table.unique(return_counts=True)
        replaced = table != table[:, :1]
        kept = torch.where(replaced.any(1), replaced.int().argmax(1), torch.full_like(table[:, 0], steps))
        blocks.append({"block": block,
                       "shares": {str(int(e)): float(c) / table.numel() for e, c in zip(experts, counts)},
                       "first_expert": int(table[:, 0].mode().values),
                       "handover": float(kept.double().mean() / steps),
                       "experts_by_step": table.mode(dim=0).values.tolist()})
    if not blocks:
        raise ValueError("time_expert_shares: no time-MoE routes were recorded (time-MoE is off)")
    return {"steps": steps, "timesteps": list(runs[0].timesteps), "prompts": int(table.shape[0]), "blocks": blocks}


def plot_confusion(result: Dict[str, object], family: str, out: Union[str, Path]) -> Path:
    """The route classifier's pooled confusion matrix, titled with its accuracy and chance level."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = 1.6 + 0.55 * len(result["classes"])
    fig, ax = subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.array(result["confusion"]), display_labels=result["classes"]).plot(
        ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title(f"{family}: accuracy {result['accuracy']:.2f} ± {result['accuracy_std']:.2f}\n"
                 f"(chance {result['chance']:.2f}, {result['samples']} paths)", fontsize=9)
    return _save(fig, out)


def plot_time_expert_shares(stats: Dict[str, object], out: Union[str, Path]) -> Path:
    """One row per block: the expert most prompts chose at each step (noisiest first), the hand-over marked."""
    table = np.array([block["experts_by_step"] for block in stats["blocks"]])  # [blocks, steps]
    fig, ax = subplots(figsize=(2.0 + 0.12 * stats["steps"], 1.2 + 0.45 * len(table)))
    image = ax.imshow(table, aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    for row, block in enumerate(stats["blocks"]):
        ax.plot([block["handover"] * stats["steps"] - 0.5] * 2, [row - 0.5, row + 0.5], color="black", lw=2)
        ax.text(stats["steps"] - 0.4, row, f" {block['handover']:.0%}", va="center", fontsize=8)
    ax.set_yticks(range(len(table)), [f"block {block['block']}" for block in stats["blocks"]])
    ax.set_xlabel("sampling step (noisiest first); bar: hand-over of the first expert")
    fig.colorbar(image, ax=ax, label="time expert")
    ax.set_title("time experts over the sampling steps", fontsize=9)
    return _save(fig, out)


def _save(fig, out: Union[str, Path]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _concept_families(families: Optional[Sequence[str]], word_lists: Optional[Union[str, Path]],
                      samples_per_concept: int, seed: int) -> ConceptPrompts:
    """The shapes families asked for (all of them when neither families nor word lists are given) and the user's."""
    if families is None:
        families = SHAPES_FAMILIES if word_lists is None else ()
    chosen = shapes_concept_prompts(families, samples_per_concept, seed)
    if word_lists is not None:
        own = load_word_lists(word_lists)
        clash = sorted(set(own) & set(chosen))
        if clash:
            raise ValueError(f"analyze: the word lists reuse the shapes families' names {clash}; rename them")
        chosen.update(own)
    if not chosen:
        raise ValueError("analyze: no concept family to analyse")
    return chosen


def analyze(pipe: RaphaelPipeline, out_dir: Union[str, Path], families: Optional[Sequence[str]] = None,
            word_lists: Optional[Union[str, Path]] = None, samples_per_concept: int = 40, steps: int = 50,
            seed: int = 0, folds: int = 5, time_prompts: int = 2) -> Dict[str, object]:
    """Both analyses; writes into out_dir analysis.json, routes_<family>.png (confusion matrix per family) and
    time_experts.png.

    families: shapes families (SHAPES_FAMILIES; all of them by default, none when word_lists is given and families
    is not); word_lists: a JSON file of the user's own (load_word_lists). The space paths come from one unguided step
    (record_concept_paths); the time experts from `time_prompts` prompts (the first of each concept) sampled over
    `steps` DDIM steps with the pipeline's default guidance (the time gate reads the timestep, and the prompt only
    through the optional pooled text). A part whose MoE the model lacks is null in the JSON."""
    out_dir = Path(out_dir)
    concept_families = _concept_families(families, word_lists, samples_per_concept, seed)
    pipe.set_progress_bar_config(disable=True)
    routes = None
    if has_space_moe(pipe):
        routes = {}
        for family, by_concept in concept_families.items():
            features, labels = record_concept_paths(pipe, by_concept, seed=seed)
            routes[family] = route_classifier(features, labels, folds=folds, seed=seed)
            plot_confusion(routes[family], family, out_dir / f"routes_{family}.png")
    time_experts = None
    if has_time_moe(pipe):
        prompts = [items[0].prompt for by_concept in concept_families.values() for items in by_concept.values()]
        recorded = pipe(prompts[:time_prompts], num_inference_steps=steps, output_type="latent", record_paths=True,
                        generator=torch.Generator().manual_seed(seed)).paths
        time_experts = time_expert_shares(recorded)
        plot_time_expert_shares(time_experts, out_dir / "time_experts.png")
    report = {"route_classifier": routes, "time_experts": time_experts,
              "settings": {"samples_per_concept": samples_per_concept, "steps": steps, "seed": seed, "folds": folds,
                           "families": list(concept_families), "word_lists": None if word_lists is None
                           else str(word_lists)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(report, indent=1))
    return report


__all__ = ["COUNT_WORDS", "ConceptPrompt", "ConceptPrompts", "END_OF_TEXT", "RELATION_WORDS", "SHAPES_FAMILIES",
           "analyze", "find_token", "load_word_lists", "plot_confusion", "plot_time_expert_shares",
           "record_concept_paths", "route_classifier", "shapes_concept_prompts", "time_expert_shares"]
