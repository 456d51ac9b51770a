"""mergekit's YAML configurations, merged by blockmerge: the keys `mergekit-yaml` reads, mapped onto blockmerge's
methods with mergekit's semantics. A key, value or method not supported yet is one error naming it."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import api, mergekit_tokens
from .engine.job import Summary
from .engine.sinks import parse_size
from .engine.sources import is_tokenizer_file, open_checkpoint
from .engine.tensors import itemsize, torch_dtype
from .errors import BlockmergeError
from .mergekit_slices import OutputSlice, SlicedModels, Source, assemble
from .mergekit_tokens import TokenizerSettings
from .plugins import get

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "slices", "modules", "tokenizer", "chat_template"}
UNSUPPORTED_KEYS = {"modules": "modules"}
DTYPES = {"float32", "float16", "bfloat16"}


@dataclass
class MergekitConfig:
    """A mergekit configuration as read: the method, the base, the models with their own parameters, the global
    parameters, the output dtype and the tokenizer settings."""

    method: str
    base: str | None
    models: list[str]
    model_parameters: list[dict[str, Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None

    def per_model(self, name: str, default: Any = None, required: bool = False) -> list[Any]:
        """Each model's value of a per-model parameter: its own, else the global one, else `default`; a list of
        filter rules that matches no tensor falls through to the next of them, as in mergekit."""
        values = []
        for model, own in zip(self.models, self.model_parameters):
            levels = [v for v in (own.get(name), self.parameters.get(name), default) if v is not None]
            if not levels and required and model != self.base:
                raise BlockmergeError(f"mergekit config: model {model} has no {name!r} (required by "
                                      f"{self.method})")
            values.append(_fall_through(levels) if levels else None)
        return values


def _rules(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return value
    return [{"value": value}]


def _fall_through(levels: list[Any]) -> Any:
    """One value for settings looked up in order: the first, or where it is a list of filter rules, its rules
    followed by the next levels' (a rule with no filter ends the lookup)."""
    first = levels[0]
    if len(levels) == 1 or not (isinstance(first, dict) or (isinstance(first, list) and first
                                                              and all(isinstance(v, dict) for v in first))):
        return first
    return [*_rules(first), *_rules(_fall_through(levels[1:]))]


def _model_path(ref: Any, where: Path) -> str:
    if isinstance(ref, dict):
        if set(ref) - {"model", "path"}:
            raise BlockmergeError(f"mergekit config: model reference {ref!r}: only a local path is supported yet")
        ref = ref.get("model", ref.get("path"))
        if isinstance(ref, dict):
            return _model_path(ref, where)
    if not isinstance(ref, str) or not ref:
        raise BlockmergeError(f"mergekit config: expected a model path, got {ref!r}")
    if "+" in ref:
        raise BlockmergeError(f"mergekit config: model {ref!r}: a LoRA applied to a model is not supported yet")
    if "@" in ref:
        raise BlockmergeError(f"mergekit config: model {ref!r}: a revision of a hub model is not supported "
                              "(blockmerge reads local directories)")
    path = Path(ref) if Path(ref).is_absolute() else where / ref
    if not path.exists():
        raise BlockmergeError("mergekit config: no such local model directory (hub models are not downloaded)",
                              path=path)
    return str(path)


def read(path: str | os.PathLike) -> MergekitConfig:
    """The configuration at `path`, checked against what blockmerge supports."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BlockmergeError(f"cannot read mergekit config ({str(err).splitlines()[0]})", path=path) from None
    if not isinstance(config, dict) or "merge_method" not in config:
        raise BlockmergeError("not a mergekit config (no merge_method)", path=path)
    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise BlockmergeError(f"unknown mergekit config key {unknown[0]!r}", path=path)
    for key, what in UNSUPPORTED_KEYS.items():
        if key in config:
            raise BlockmergeError(f"mergekit's {what} is not supported yet", path=path)
    method = config["merge_method"]
    if method not in METHODS:
        raise BlockmergeError(f"mergekit method {method!r} is not supported yet (supported: "
                              f"{', '.join(sorted(METHODS))})", path=path)
    where = path.parent
    base = _model_path(config["base_model"], where) if config.get("base_model") is not None else None
    dtype = _dtype(config, path)
    parameters = config.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BlockmergeError("mergekit config: parameters must be a mapping", path=path)
    tokenizer = mergekit_tokens.settings(config, lambda ref: _model_path(ref, where))
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise BlockmergeError(f"mergekit config: chat_template must be a text, got {template!r}", path=path)
    if "slices" in config:
        return dataclasses.replace(_sliced(config, path, base, parameters, dtype, tokenizer), chat_template=template)
    entries = config.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise BlockmergeError("mergekit config: models must be a non-empty list", path=path)
    models, own = [], []
    for entry in entries:
        ref = entry.get("model") if isinstance(entry, dict) else entry
        own_parameters = entry.get("parameters", {}) if isinstance(entry, dict) else {}
        if not isinstance(own_parameters, dict):
            raise BlockmergeError(f"mergekit config: parameters of {ref!r} must be a mapping", path=path)
        models.append(_model_path(ref, where))
        own.append(own_parameters)
    if base is not None and base not in models:  # as mergekit does: the base becomes an input with no parameters
        models.append(base)
        own.append({})
    return MergekitConfig(method, base, models, own, parameters, dtype, tokenizer, template)


def _dtype(config: dict[str, Any], path: Path) -> str | None:
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is None:
        return None
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise BlockmergeError(f"mergekit config: dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}", path=path)
    return dtype


class SliceSettings(dict):
    """The global settings of a sliced configuration, each evaluated per output tensor on lookup."""

    def __init__(self, sliced: SlicedModels):
        super().__init__()
        self.sliced = sliced

    def get(self, name: str, default: Any = None) -> Any:
        return self.sliced.setting(name, default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.sliced.setting(name) is not None

    def __getitem__(self, name: str) -> Any:
        return self.sliced.setting(name)


@dataclass
class SlicedConfig(MergekitConfig):
    """A configuration of `slices`: its input models are assembled from the sources at each position."""

    sliced: SlicedModels | None = None

    def per_model(self, name: str, default: Any = None, required: bool = False) -> list[Any]:
        values = self.sliced.per_model(name, default)
        for model, value in zip(self.models, values):
            if value is None and required and model is not self.base:
                raise BlockmergeError(f"mergekit config: a slice source has no {name!r} (required by {self.method})")
        return values


def _sliced(config: dict[str, Any], path: Path, base: str | None, parameters: dict[str, Any],
            dtype: str | None, tokenizer: TokenizerSettings | None) -> SlicedConfig:
    if config.get("models") is not None:
        raise BlockmergeError("mergekit config: give either models or slices, not both", path=path)
    pieces = config["slices"]
    if not isinstance(pieces, list) or not pieces:
        raise BlockmergeError("mergekit config: slices must be a non-empty list", path=path)
    slices = []
    for piece in pieces:
        sources = piece.get("sources") if isinstance(piece, dict) else None
        if not isinstance(sources, list) or not sources:
            raise BlockmergeError("mergekit config: each slice needs a non-empty list of sources", path=path)
        read_sources = []
        for source in sources:
            span = source.get("layer_range") if isinstance(source, dict) else None
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
                raise BlockmergeError(f"mergekit config: a slice source needs layer_range: [start, end], got "
                                      f"{source!r}", path=path)
            read_sources.append(Source(_model_path(source.get("model"), path.parent), span[0], span[1],
                                       source.get("parameters") or {}))
        own_base = piece.get("base_model")
        slices.append(OutputSlice(read_sources, piece.get("parameters") or {},
                                  _model_path(own_base, path.parent) if own_base is not None else None))
    sliced = assemble(slices, parameters, base)
    return SlicedConfig(config["merge_method"], sliced.base, list(sliced.models), [{} for _ in sliced.models],
                        SliceSettings(sliced), dtype, tokenizer, sliced=sliced)


@dataclass(frozen=True)
class Translation:
    """How a mergekit method becomes a blockmerge merge: the method and its arguments."""

    method: str
    models: list[str]
    base: str | None
    hyperparameters: dict[str, Any]


def _scalar(cfg: MergekitConfig, name: str, default: Any) -> Any:
    value = cfg.parameters.get(name, default)
    if not isinstance(value, (bool, int, float)):
        raise BlockmergeError(f"mergekit config: {name} given per tensor is not supported yet")
    return value


def _linear(cfg: MergekitConfig) -> Translation:
    weights = cfg.per_model("weight", required=True)
    order = sorted(range(len(cfg.models)), key=lambda i: cfg.models[i] != cfg.base)  # the base's files first
    return Translation("linear", [cfg.models[i] for i in order], None,
                       {"weights": [weights[i] for i in order], "normalize": bool(_scalar(cfg, "normalize", True))})


def _slerp(cfg: MergekitConfig) -> Translation:
    if cfg.base is None:
        raise BlockmergeError("mergekit config: slerp needs base_model (the model at t = 0)")
    others = [m for m in cfg.models if m != cfg.base]
    if len(others) != 1:
        raise BlockmergeError(f"mergekit config: slerp merges base_model and exactly one other model, got "
                              f"{len(others)} others")
    if "t" not in cfg.parameters:
        raise BlockmergeError("mergekit config: slerp needs the parameter t")
    return Translation("slerp", [cfg.base, others[0]], None, {"t": cfg.parameters["t"]})


def _complement(value: Any) -> Any:
    """1 − a setting (a number, a gradient or filter rules), for mergekit's density as blockmerge's drop rate."""
    if isinstance(value, dict):
        return {**value, "value": _complement(value["value"])}
    if isinstance(value, list):
        return [_complement(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BlockmergeError(f"mergekit config: density {value!r} is not a number")
    return 1.0 - value


@dataclass(frozen=True)
class TaskVectorFamily:
    """A method of mergekit's generalized task arithmetic: blockmerge's method, its consensus, and mergekit's
    defaults of normalize and rescale."""

    method: str
    consensus: str
    normalize: bool
    rescale: bool


GTA = {"task_arithmetic": TaskVectorFamily("task_arithmetic", "none", False, False),
       "ties": TaskVectorFamily("ties", "sign", True, False),
       "dare_ties": TaskVectorFamily("dare", "sign", False, True),
       "dare_linear": TaskVectorFamily("dare", "none", False, True),
       "breadcrumbs": TaskVectorFamily("breadcrumbs", "none", False, False),
       "breadcrumbs_ties": TaskVectorFamily("breadcrumbs", "sign", False, False),
       "della": TaskVectorFamily("della", "sign", True, True),
       "della_linear": TaskVectorFamily("della", "none", False, True)}


def _task_vectors(cfg: MergekitConfig) -> Translation:
    """mergekit's generalized task arithmetic: per-model weights and densities, its sparsifiers' counts, its sign
    rule (+ where the weighted sum is 0), its L1 rescale and normalisation (task arithmetic sparsifies nothing, so
    its rescale changes nothing)."""
    family = GTA[cfg.method]
    others = [i for i, m in enumerate(cfg.models) if m != cfg.base]
    if cfg.base is None:
        raise BlockmergeError(f"mergekit config: {cfg.method} needs base_model")

    def pick(values: list[Any]) -> list[Any]:
        return [values[i] for i in others]

    rescale = bool(_scalar(cfg, "rescale", family.rescale))
    hp: dict[str, Any] = {"weights": pick(cfg.per_model("weight", required=True)),
                          "normalize": bool(_scalar(cfg, "normalize", family.normalize)),
                          "scaling_factor": cfg.parameters.get("lambda", 1.0)}
    density = pick(cfg.per_model("density", 1.0))
    if family.method == "ties":
        hp.update(density=density, trim="block", exact_count=True, majority_sign="plus",
                  rescale="l1" if rescale else False)
    elif family.method == "dare":
        hp.update(drop_rate=[_complement(d) for d in density], consensus=family.consensus,
                  rescale="l1" if rescale else False)
    elif family.method == "breadcrumbs":
        hp.update(density=density, gamma=pick(cfg.per_model("gamma", 0.01)), consensus=family.consensus,
                  rescale="l1" if rescale else False)
    elif family.method == "della":
        hp.update(density=density, epsilon=pick(cfg.per_model("epsilon", 0.15)), consensus=family.consensus,
                  rescale="l1" if rescale else False)
    return Translation(family.method, [cfg.models[i] for i in others], cfg.base, hp)


def _others(cfg: MergekitConfig) -> list[str]:
    if cfg.base is None:
        raise BlockmergeError(f"mergekit config: {cfg.method} needs base_model")
    return [m for m in cfg.models if m != cfg.base]


def _model_stock(cfg: MergekitConfig) -> Translation:
    return Translation("model_stock", _others(cfg), cfg.base, {"filter_wise": bool(_scalar(cfg, "filter_wise", False))})


def _nearswap(cfg: MergekitConfig) -> Translation:
    if "t" not in cfg.parameters:
        raise BlockmergeError("mergekit config: nearswap needs the parameter t")
    return Translation("nearswap", _others(cfg), cfg.base, {"t": cfg.parameters["t"]})


def _nuslerp(cfg: MergekitConfig) -> Translation:
    if _scalar(cfg, "nuslerp_row_wise", False):
        raise BlockmergeError("mergekit config: nuslerp_row_wise is not supported yet")
    others = [i for i, m in enumerate(cfg.models) if m != cfg.base]
    if len(others) != 2:
        raise BlockmergeError(f"mergekit config: nuslerp merges exactly two models beside the base, got {len(others)}")
    weights = cfg.per_model("weight", required=True)
    return Translation("nuslerp", [cfg.models[i] for i in others], cfg.base,
                       {"weights": [weights[i] for i in others], "flatten": bool(_scalar(cfg, "nuslerp_flatten", True)),
                        "task_vectors": cfg.base is not None})


def _multislerp(cfg: MergekitConfig) -> Translation:
    others = [i for i, m in enumerate(cfg.models) if m != cfg.base]
    weights = cfg.per_model("weight", required=True)
    return Translation("multislerp", [cfg.models[i] for i in others], cfg.base,
                       {"weights": [weights[i] for i in others], "task_vectors": cfg.base is not None,
                        "normalize_weights": bool(_scalar(cfg, "normalize_weights", True)),
                        "eps": float(_scalar(cfg, "eps", 1e-8))})


def _karcher(cfg: MergekitConfig) -> Translation:
    """Every input averaged alike, the base too where mergekit adds it as one."""
    return Translation("karcher", cfg.models, None, {"max_iter": int(_scalar(cfg, "max_iter", 10)),
                                                     "tol": float(_scalar(cfg, "tol", 1e-5))})


def _ram(cfg: MergekitConfig) -> Translation:
    """RAM, and RAM+ (tensor-local) with its boost of each model's unique entries."""
    boost = cfg.method == "ramplus_tl"
    return Translation("ram", _others(cfg), cfg.base,
                       {"epsilon": float(_scalar(cfg, "epsilon", 1e-5)), "r": float(_scalar(cfg, "r", 0.1)) if boost
                        else 0.0, "alpha": float(_scalar(cfg, "alpha", 0.2))})


def _sce(cfg: MergekitConfig) -> Translation:
    """SCE: mergekit's per-model weights and densities do not apply to it."""
    return Translation("sce", _others(cfg), cfg.base, {"select_topk": cfg.parameters.get("select_topk", 1.0)})


def _arcee_fusion(cfg: MergekitConfig) -> Translation:
    others = _others(cfg)
    if len(others) != 1:
        raise BlockmergeError(f"mergekit config: arcee_fusion merges base_model and exactly one other model, got "
                              f"{len(others)} others")
    return Translation("arcee_fusion", others, cfg.base, {})


def _passthrough(cfg: MergekitConfig) -> Translation:
    if len(cfg.models) != 1:
        raise BlockmergeError(f"mergekit config: passthrough takes exactly one model per tensor, got {len(cfg.models)}")
    scale = cfg.per_model("scale")[0]
    return Translation("passthrough", cfg.models, None, {} if scale is None else {"scale": scale})


METHODS: dict[str, Callable[[MergekitConfig], Translation]] = {
    "linear": _linear, "slerp": _slerp, "model_stock": _model_stock, "nearswap": _nearswap, "nuslerp": _nuslerp,
    "multislerp": _multislerp, "karcher": _karcher, "ram": _ram, "ramplus_tl": _ram, "sce": _sce,
    "arcee_fusion": _arcee_fusion, "passthrough": _passthrough,
    **{name: _task_vectors for name in GTA},
}


def shard_bytes(size: str | int, element_bytes: int) -> int:
    """Bytes of an output shard: an int is bytes; a text is mergekit's `--out-shard-size`, parameters (`500M`, `5B`,
    `1000`), or bytes with a byte unit (`2GiB`)."""
    if isinstance(size, int):
        return size
    text = size.strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)", text)
    if match is None:
        return parse_size(text, "out_shard_size")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[match.group(2).lower()]
    return max(1, int(float(match.group(1)) * scale)) * element_bytes


def _element_bytes(cfg: MergekitConfig, translation: Translation) -> int:
    """Bytes of an output element: of the configuration's dtype, else of the base's (or first model's) floats."""
    if cfg.dtype is not None:
        return itemsize(cfg.dtype)
    first = open_checkpoint(translation.base or translation.models[0], "base")
    floats = [s.dtype for s in first.specs.values() if torch_dtype(s.dtype).is_floating_point]
    return itemsize(floats[0]) if floats else 4


def _directories(cfg: MergekitConfig) -> list[str]:
    """The model directories a configuration reads (a slice source's own directory)."""
    if isinstance(cfg, SlicedConfig):
        return sorted({s.path for piece in cfg.sliced.slices for s in piece.sources})
    return list(dict.fromkeys([*([cfg.base] if cfg.base else []), *cfg.models]))


def _with_tokenizer(cfg: MergekitConfig, translation: Translation, copy_tokenizer: bool, workdir: Path
                    ) -> tuple[Translation, bool | str]:
    """The translation's models in the output vocabulary where the tokenizer settings change it, and where the
    output's tokenizer comes from (True: the files of the base or first model; a directory; False: none)."""
    setting = cfg.tokenizer
    if setting is None:
        return translation, copy_tokenizer
    directories = _directories(cfg)
    aligned = mergekit_tokens.align(setting, directories, cfg.base if isinstance(cfg.base, str) else None, workdir)
    if aligned is None:
        return translation, True if setting.source in ("base", "union") else setting.source
    if isinstance(cfg, SlicedConfig):
        raise BlockmergeError("mergekit config: slices over models of different vocabularies are not supported yet")

    def view(model: Any) -> Any:
        return aligned.views.get(model, model) if isinstance(model, str) else model

    return dataclasses.replace(translation, models=[view(m) for m in translation.models],
                               base=view(translation.base)), str(workdir)


def _with_chat_template(cfg: MergekitConfig, translation: Translation, tokenizer: bool | str, workdir: Path
                        ) -> bool | str:
    """Where the output's tokenizer comes from once the configuration's chat template is set in it."""
    if cfg.chat_template is None or tokenizer is False:
        return tokenizer
    if isinstance(tokenizer, str):
        donor = tokenizer
    else:
        first = translation.base or translation.models[0]
        donor = first if isinstance(first, str) else next(
            (str(f.parent) for f in first.files if is_tokenizer_file(f)), None)
    if donor is None:
        return tokenizer
    return mergekit_tokens.with_chat_template(donor, cfg.chat_template, _directories(cfg), workdir / "chat")


def card_text(cfg: MergekitConfig, config_text: str) -> str:
    """A README.md for the merged model: how it was made."""
    models = "\n".join(f"- `{getattr(m, 'label', m)}`" for m in cfg.models if m != cfg.base)
    base = f"\nBase model: `{getattr(cfg.base, 'label', cfg.base)}`.\n" if cfg.base else ""
    return (f"# Merged model\n\nMerged with blockmerge from a mergekit configuration, method `{cfg.method}`.\n"
            f"{base}\nModels:\n\n{models}\n\nConfiguration:\n\n```yaml\n{config_text.rstrip()}\n```\n")


def merge(config: str | os.PathLike, out: str | os.PathLike, *, device: str = "cpu", out_shard_size: str | int = "5B",
          copy_tokenizer: bool = True, seed: int | None = None, model_card: bool = False, overwrite: bool = False,
          progress: bool = False, **engine: Any) -> Summary:
    """Merge as the mergekit configuration at `config` says, into the Hugging Face directory `out`: shards of
    `out_shard_size` (bytes, or a text in mergekit's units: see `shard_bytes`); `seed` seeds the random methods;
    `model_card` writes a README.md; `engine`: options of `blockmerge.merge` that do not change the result
    (`block_size`, `executor`, `scheduler`, `resume`, `compute_dtype`)."""
    cfg = read(config)
    try:
        return _merge(cfg, config, out, device=device, out_shard_size=out_shard_size, copy_tokenizer=copy_tokenizer,
                      seed=seed, model_card=model_card, overwrite=overwrite, progress=progress, engine=engine)
    finally:
        if isinstance(cfg, SlicedConfig):
            cfg.sliced.workdir.cleanup()


def _merge(cfg: MergekitConfig, config: str | os.PathLike, out: str | os.PathLike, *, device: str,
           out_shard_size: str | int, copy_tokenizer: bool, seed: int | None, model_card: bool, overwrite: bool,
           progress: bool, engine: dict[str, Any]) -> Summary:
    translation = METHODS[cfg.method](cfg)
    hyperparameters = dict(translation.hyperparameters)
    if seed is not None and "seed" in {f.name for f in dataclasses.fields(get(translation.method).hyperparameters)}:
        hyperparameters["seed"] = seed
    element_bytes = _element_bytes(cfg, translation)
    with tempfile.TemporaryDirectory(prefix="blockmerge-tokenizer-") as workdir:
        translation, tokenizer = _with_tokenizer(cfg, translation, copy_tokenizer, Path(workdir))
        tokenizer = _with_chat_template(cfg, translation, tokenizer, Path(workdir))
        summary = api.merge(translation.method, translation.models, base=translation.base, out=out, format="hf",
                            dtype=cfg.dtype, device=device, overwrite=overwrite, progress=progress,
                            max_shard_size=shard_bytes(out_shard_size, element_bytes),
                            copy_tokenizer=tokenizer, **engine, **hyperparameters)
    if model_card:
        card = Path(out) / "README.md"
        partial = card.with_name(".README.md.partial")
        partial.write_text(card_text(cfg, Path(config).read_text()))
        os.replace(partial, card)
    return summary
