"""Loading the student, teacher and reference models and the shared tokenizer from config, and the
checks that refuse a bad source before any weights load.

A model comes from a local path or hub name (``path``), or is a random-init tiny Qwen3 built in
place (``tiny``: Qwen3Config overrides) for tests and laptop runs. Loading failures of
transformers (a missing folder, a broken ``config.json`` or tokenizer, a model offline mode
cannot find) become ``ConfigError``s that name the config key, e.g.
``teacher.path='runs/x': not a local directory and not in the Hugging Face cache ...``.

Trust: ``trust_remote_code`` is off unless a model's own spec turns it on, and each source uses
its own flag: ``student``, ``teacher`` and ``reference`` their own; the tokenizer
``tokenizer.trust_remote_code`` when ``tokenizer.path`` is set, else the student's (it is then
read from the student's folder).

Vocabulary rule: one tokenizer is shared by every view, so token id ``i`` means the same in each.
Output heads may be padded beyond the tokenizer (Qwen3's heads have 151,936 rows for ~151,669
ids); the padded rows are never targets and have near-zero probability in trained models. So the
student and teacher (and reference) may differ in head size as long as every head has a row for
every id the tokenizer can produce (``size >= len(tokenizer)``); the scoring code then compares
distributions over the common size ``min(sizes)``, slicing ``logits[..., :common]``. Otherwise
the run is refused, naming every size and ``len(tokenizer)``. A path model that ships its own
tokenizer must agree with the shared one on every id both define, or the run is refused.

    tokenizer = check_sources(config)   # fail fast: tokenizer, paths, tiny overrides, sizes
    student = load_model(config.student, tokenizer, seed=0, key="student")
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
)

from dopd.errors import ConfigError, quote
from dopd.modeling.tiny import build_char_tokenizer, build_tiny_model
from dopd.modeling.tiny_vlm import (
    ImageOnlyQwen2VLProcessor,
    ImageOnlyQwen3VLProcessor,
    build_tiny_vlm,
    build_tiny_vlm_processor,
    build_vlm_char_tokenizer,
)

_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# What from_pretrained raises for a bad source (OSError: missing or offline; ValueError: broken
# config, unknown architecture, remote code refused; ImportError: a missing tokenizer backend).
LOAD_ERRORS = (OSError, ValueError, ImportError)
# What Qwen3Config / the model constructor raise for bad tiny overrides: a wrong type (TypeError),
# a value Qwen3Config's validators refuse (StrictDataclassError), zero heads (ZeroDivisionError),
# a negative size (RuntimeError from torch).
BUILD_ERRORS = (
    TypeError,
    ValueError,
    ArithmeticError,
    RuntimeError,
    KeyError,
    StrictDataclassError,
)
# tiny keys dopd sets itself, and where from.
RESERVED_TINY = {
    "bos_token_id": "the tokenizer",
    "eos_token_id": "the tokenizer",
    "pad_token_id": "the tokenizer",
    "seed": "the top-level seed",
    "attn_implementation": "",  # "": the model's own key beside tiny (student.attn_implementation)
}
TINY_KEYS = frozenset(Qwen3Config().to_dict()) | frozenset(
    name for name in inspect.signature(build_tiny_model).parameters if name != "overrides"
)
# The keys of a tiny vision-language model (``tiny: {family: qwen3_vl, ...}``): family and
# build_tiny_vlm's sizes; vocab_size as for a text model.
TINY_VLM_KEYS = frozenset(
    name
    for name in inspect.signature(build_tiny_vlm).parameters
    if name not in ("tokenizer", "seed", "text_overrides")
) | {"vocab_size"}


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(tokenizer_spec, student_spec) -> PreTrainedTokenizerBase:
    """The tokenizer every view shares: a char tokenizer, ``tokenizer.path`` or the student's.

    A tokenizer without a pad token pads with its EOS token: validity comes from the first EOS
    (``dopd.modeling.alignment.completion_mask_after_eos``), never from ``!= pad``, so that is safe.

    Raises:
        ConfigError: the source cannot be loaded, or the tokenizer has no EOS token; the message
            names the config key (``tokenizer.path`` or ``student.path``).
    """
    if tokenizer_spec.characters is not None:
        key, source = "tokenizer.characters", tokenizer_spec.characters
        vlm = getattr(student_spec, "kind", "causal_lm") == "image_text_to_text"
        build = build_vlm_char_tokenizer if vlm else build_char_tokenizer
        tokenizer = build(tokenizer_spec.characters)  # a VLM's: with the vision tokens
    else:
        key, source, trust = tokenizer_source(tokenizer_spec, student_spec)
        tokenizer = load_pretrained(AutoTokenizer, key, source, trust_remote_code=trust)
    return with_eos_and_pad(tokenizer, f"{key}={quote(source)}")


def with_eos_and_pad(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    """``tokenizer``, padding with its EOS token where it has no pad token; a ``ConfigError``
    naming ``where`` if it has no EOS token (no completion could end)."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"{where}: the tokenizer has no eos_token, so no completion could end; "
            "fix: set eos_token in its tokenizer_config.json (or use the model's own tokenizer)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_source(tokenizer_spec, student_spec) -> tuple[str, str, bool]:
    """``(config key, path, trust_remote_code)`` of a pretrained shared tokenizer."""
    if tokenizer_spec.path is not None:
        return "tokenizer.path", tokenizer_spec.path, tokenizer_spec.trust_remote_code
    return "student.path", student_spec.path, student_spec.trust_remote_code


def load_model(
    spec, tokenizer: PreTrainedTokenizerBase, *, seed: int, key: str | None = None
) -> PreTrainedModel:
    """A causal LM from ``spec.path`` or a tiny random-init Qwen3 from ``spec.tiny``.

    ``key`` (``"student"``, ``"teacher"``, ``"reference"``) names the spec in error messages.
    The spec's ``dtype`` and ``attn_implementation`` apply to this model alone (``auto``: the
    checkpoint's dtype, or float32 for a tiny model; transformers' default attention).
    """
    if spec.tiny is not None:
        model = build_tiny(
            spec.tiny,
            tokenizer,
            seed=seed,
            key=f"{key}.tiny" if key else "tiny",
            attn_implementation=spec.attn_implementation,
        )
        return model if spec.dtype == "auto" else model.to(_DTYPES[spec.dtype])
    vlm = getattr(spec, "kind", "causal_lm") == "image_text_to_text"
    return load_pretrained(
        AutoModelForImageTextToText if vlm else AutoModelForCausalLM,
        f"{key}.path" if key else "path",
        spec.path,
        dtype=_DTYPES[spec.dtype],
        trust_remote_code=spec.trust_remote_code,
        **attention_kwargs(spec.attn_implementation),
    )


def attention_kwargs(attn_implementation: str) -> dict[str, str]:
    """The ``attn_implementation`` kwarg of ``from_pretrained`` / ``Qwen3Config`` (auto: none)."""
    return {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}


def build_tiny(
    tiny: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    key: str,
    attn_implementation: str = "auto",
) -> PreTrainedModel:
    """``build_tiny_model`` from the ``tiny`` overrides, its special ids from ``tokenizer``.

    ``vocab_size`` (default ``len(tokenizer)``) sets the head size, so a tiny model can have a
    padded head like a real one. Unknown or reserved keys and overrides that cannot build a
    model are ``ConfigError``s naming ``key``; an attention kernel this machine lacks (e.g.
    ``flash_attention_2`` without its package) one naming the spec's ``attn_implementation``.
    """
    options = dict(tiny)
    if "family" in options:
        return _build_tiny_vlm(options, tokenizer, seed=seed, key=key)
    for name, owner in RESERVED_TINY.items():
        if name in options:
            owner = owner or _sibling(key, name)
            raise ConfigError(f"{key}.{name} is set by {owner}; fix: remove it from {key}")
    for name in options:
        if name not in TINY_KEYS:
            close = difflib.get_close_matches(name, sorted(TINY_KEYS), n=1)
            hint = f"did you mean {key}.{close[0]}?" if close else "see transformers.Qwen3Config"
            raise ConfigError(f"{key}.{name} is not a Qwen3Config key; {hint}")
    vocab_size = options.pop("vocab_size", len(tokenizer))
    ids = {
        f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")
    }
    attention = attention_kwargs(attn_implementation)
    try:
        return build_tiny_model(vocab_size, seed=seed, **ids, **options, **attention)
    except ImportError as error:  # transformers: the requested attention's package is missing
        attn_key = _sibling(key, "attn_implementation")
        raise ConfigError(
            f"{attn_key}={attn_implementation!r}: {_first_line(error)}; "
            f"fix: {_attention_fix(attn_key)}"
        ) from None
    except BUILD_ERRORS as error:
        raise ConfigError(
            f"{key}={quote(dict(tiny))}: cannot build a Qwen3 model ({type(error).__name__}: "
            f"{_first_line(error)}); fix: give positive integer sizes that Qwen3Config accepts"
        ) from None


def _build_tiny_vlm(
    options: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, seed: int, key: str
) -> PreTrainedModel:
    """``build_tiny_vlm`` from ``tiny: {family: ..., sizes}``; bad keys name ``key``."""
    for name in options:
        if name not in TINY_VLM_KEYS:
            close = difflib.get_close_matches(name, sorted(TINY_VLM_KEYS), n=1)
            hint = f"did you mean {key}.{close[0]}?" if close else f"use {sorted(TINY_VLM_KEYS)}"
            raise ConfigError(f"{key}.{name} is not a tiny vision-language model key; {hint}")
    family = options.pop("family")
    try:
        return build_tiny_vlm(family, tokenizer, seed=seed, **options)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None
    except BUILD_ERRORS as error:
        raise ConfigError(
            f"{key}={quote(dict(options, family=family))}: cannot build a {family} model "
            f"({type(error).__name__}: {_first_line(error)}); fix: give positive integer sizes"
        ) from None


def load_processor(config, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The processor of a vision-language run (``config.is_vlm``): a tiny student's
    (``build_tiny_vlm_processor`` around ``tokenizer``, from the student's vision config), else
    ``AutoProcessor`` from ``tokenizer.path`` or the student's path."""
    if config.student.tiny is not None and config.tokenizer.characters is not None:
        with torch.device("meta"):
            model = build_tiny(config.student.tiny, tokenizer, seed=0, key="student.tiny")
        return build_tiny_vlm_processor(tokenizer, model.config)
    if config.tokenizer.characters is not None:
        raise ConfigError(
            "tokenizer.characters with a pretrained vision-language student: its processor "
            "needs the student's image settings; fix: remove tokenizer.characters"
        )
    return pretrained_processor(*tokenizer_source(config.tokenizer, config.student))


def pretrained_processor(key: str, source: str, trust: bool = False) -> Any:
    """The vision-language processor of folder or hub id ``source`` (``AutoProcessor``, or a
    tiny export's image-only processor); a ``ConfigError`` naming ``key`` when it has none."""
    processor = load_pretrained(AutoProcessor, key, source, trust_remote_code=trust)
    if hasattr(processor, "image_processor"):
        return processor
    # A tiny run's export names its image-only processor, which AutoProcessor does not know.
    manifest = Path(source).expanduser() / "processor_config.json"
    name = json.loads(manifest.read_text()).get("processor_class") if manifest.is_file() else None
    own = {cls.__name__: cls for cls in (ImageOnlyQwen2VLProcessor, ImageOnlyQwen3VLProcessor)}
    if name in own:
        return load_pretrained(own[name], key, source)
    raise ConfigError(
        f"{key}={quote(source)}: AutoProcessor found no image processor there "
        f"(got {type(processor).__name__}); fix: point it at the vision-language model's folder "
        "or hub id, which holds preprocessor_config.json / processor_config.json"
    )


def load_pretrained(loader: Any, key: str, path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, **kwargs)``; a failure is a ``ConfigError`` naming ``key``."""
    local = Path(path).expanduser()
    if _looks_local(path) and not local.exists():
        raise ConfigError(
            f"{key}={quote(path)}: no such directory; fix: give an existing model folder "
            "(one written by save_pretrained) or a hub id such as Qwen/Qwen3-0.6B"
        )
    try:
        return loader.from_pretrained(path, **kwargs)
    except LOAD_ERRORS as error:
        raise ConfigError(
            f"{key}={quote(path)}: {_why(local)} ({type(error).__name__}: {_first_line(error)}); "
            f"fix: {_fix(key, local, error, 'attn_implementation' in kwargs)}"
        ) from None


def _sibling(tiny_key: str, name: str) -> str:
    """The key ``name`` beside ``tiny_key``: ``student.tiny`` -> ``student.<name>``."""
    return tiny_key.removesuffix("tiny") + name


def _attention_fix(attn_key: str) -> str:
    return (
        f"set {attn_key} to auto, sdpa or eager, or install what the chosen kernel needs "
        "(e.g. the flash-attn package for flash_attention_2)"
    )


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``org/name``): absolute, ``./``, ``~``, ``a/b/c``."""
    return (
        Path(path).is_absolute()
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or "\\" in path
    )


def _why(local: Path) -> str:
    if local.is_dir():
        return "cannot load this folder"
    if local.exists():
        return "is a file, not a model folder"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "not a local directory and not in the Hugging Face cache (HF_HUB_OFFLINE=1)"
    return "not a local directory, and the hub could not provide it"


def _fix(key: str, local: Path, error: Exception, attention: bool = False) -> str:
    role = key.split(".")[0]
    if "trust_remote_code" in str(error):
        return f"set {role}.trust_remote_code: true, only if you trust that repository's code"
    if attention and "attention" in str(error).lower():
        return _attention_fix(f"{role}.attn_implementation")
    if local.is_dir():
        return "point it at a folder written by save_pretrained (config.json, weights, tokenizer)"
    return "give an existing folder or a hub id (download it first when offline)"


def _first_line(error: Exception, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Checks


def check_sources(config) -> PreTrainedTokenizerBase:
    """Fail fast on the model and tokenizer sources of a ``TrainConfig``; return the tokenizer.

    Cheap: loads the tokenizer, each path model's ``config.json`` (and own tokenizer, to compare)
    and builds tiny models on the meta device, so a typo in ``teacher.path`` surfaces before the
    student's weights load and before ``output_dir`` is touched. Applies the vocabulary rule to
    the head sizes the configs declare.
    """
    tokenizer = load_tokenizer(config.tokenizer, config.student)
    shared_path = (
        None
        if config.tokenizer.characters
        else tokenizer_source(config.tokenizer, config.student)[1]
    )
    sizes = {}
    for role, spec in used_models(config).items():
        if spec.tiny is not None:
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                model = build_tiny(
                    spec.tiny,
                    tokenizer,
                    seed=0,
                    key=f"{role}.tiny",
                    attn_implementation=spec.attn_implementation,
                )
            sizes[role] = output_size(model)
            continue
        model_config = load_pretrained(
            AutoConfig, f"{role}.path", spec.path, trust_remote_code=spec.trust_remote_code
        )
        size = getattr(model_config.get_text_config(), "vocab_size", None)
        if isinstance(size, int):
            sizes[role] = size
        if spec.path != shared_path:
            check_tokenizers_agree(tokenizer, role, spec)
    common_vocabulary(sizes, len(tokenizer))
    return tokenizer


def used_models(config) -> dict[str, Any]:
    """The model specs a run loads, by config key: student, teacher and reference if used."""
    specs = {"student": config.student}
    if config.objective.build().uses_teacher:
        specs["teacher"] = config.teacher
    if config.reference is not None:
        specs["reference"] = config.reference
    return specs


def check_tokenizers_agree(shared: PreTrainedTokenizerBase, role: str, spec) -> None:
    """Refuse a path model whose own tokenizer maps an id both define to a different token.

    A model folder without a loadable tokenizer has nothing to compare and passes.
    """
    try:
        own = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except LOAD_ERRORS:
        return
    mismatch = first_disagreement(shared, own)
    if mismatch is not None:
        index, shared_token, own_token = mismatch
        raise ConfigError(
            f"{role}.path={quote(spec.path)}: its tokenizer has {quote(own_token)} at id {index} "
            f"where the shared tokenizer has {quote(shared_token)}; fix: use models of one "
            "tokenizer family (the teacher scores the student's token ids)"
        )


def first_disagreement(first: Any, second: Any) -> tuple[int, str | None, str | None] | None:
    """The lowest id below both lengths whose token differs, as ``(id, first's, second's)``."""
    tokens = [{index: token for token, index in t.get_vocab().items()} for t in (first, second)]
    for index in range(min(len(first), len(second))):
        if tokens[0].get(index) != tokens[1].get(index):
            return index, tokens[0].get(index), tokens[1].get(index)
    return None


def output_size(model: PreTrainedModel) -> int:
    """Rows of the model's output head (its logits' last dimension)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def common_vocabulary(sizes: Mapping[str, int], tokenizer_size: int) -> int:
    """The vocabulary rule: ``min(sizes)`` if every head covers the tokenizer's ids, else refuse.

    Args:
        sizes: config key (``student``, ``teacher``, ...) -> output head size.
        tokenizer_size: ``len(tokenizer)``.

    Raises:
        ConfigError: naming every size and ``tokenizer_size``.
    """
    short = [role for role, size in sizes.items() if size < tokenizer_size]
    if short:
        listed = ", ".join(f"{role} output size {size}" for role, size in sizes.items())
        raise ConfigError(
            f"vocabulary mismatch: {listed}, but the shared tokenizer has {tokenizer_size} ids "
            f"and every one needs a row in each output head ({', '.join(short)} too small); "
            f"fix: use models of one tokenizer family whose heads have >= {tokenizer_size} rows"
        )
    return min(sizes.values(), default=tokenizer_size)
