"""Build the base model and tokenizer of a resolved checkpoint, with weights from the safe loader.

The weights always come from :func:`lmscan.models.safe_load.load_state_dict` (so the
pickle check runs before anything else touches them); transformers only builds the
architecture from the config and copies the tensors in. Nothing in the model folder
is imported or executed: ``trust_remote_code`` is always off and everything is read
with ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmscan.errors import CannotAssess, InputError
from lmscan.models.architectures import ArchInfo, check_config, identify
from lmscan.models.resolve import CONFIG_FILE, ResolvedModel
from lmscan.models.safe_load import load_state_dict

# Files one of which a loadable tokenizer needs (transformers 5 otherwise builds an
# empty tokenizer that knows only the special tokens).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "spm.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (the base encoder/decoder), eval mode, frozen
    tokenizer: Any  # transformers tokenizer
    config: Any  # transformers PretrainedConfig
    arch: ArchInfo
    resolved: ResolvedModel
    device: torch.device
    missing_keys: list[str] = field(default_factory=list)  # model weights the checkpoint lacked (pooler)
    unexpected_keys: list[str] = field(default_factory=list)  # checkpoint tensors the base model ignores
    labels: list[str] | None = None  # the classification head's id2label, in index order (label site)
    pooling: str | None = None  # the sentence-transformers pooling (embedding site), described
    # Sites the checkpoint's files promise but lmscan cannot compute, with why (e.g. a
    # sentence-transformers folder whose pooling config is unreadable: no ``embedding``).
    skipped_sites: dict[str, str] = field(default_factory=dict)
    stored_dtypes: list[str] = field(default_factory=list)  # floating dtypes in the weight files
    # A decoder's untied LM head (vocab, hidden): the base model drops it, next-token reads need it.
    lm_head: Any = None


def load_model(
    resolved: ResolvedModel,
    device: str = "cpu",
    eager_attention: bool = False,
    dtype: torch.dtype = torch.float32,
    for_scan: bool = False,
    raw_config: dict | None = None,
) -> LoadedModel:
    """Load ``resolved`` as a frozen base model in eval mode on ``device``.

    ``for_scan``: ``model`` is a ScanModel that also carries what the checkpoint ships
    on top of the encoder (a sequence-classification head, sentence-transformers
    pooling), so a scan reads the ``label`` and ``embedding`` sites from the same pass.
    Weights stored in fp16/bf16 are computed in ``dtype``: fp32 unless the caller chose the
    stored dtype (a scan does where the device computes it natively: device.compute_dtype).

    ``raw_config``: the config.json already read (a scan plan holds it); read here otherwise.

    Raises UnsafeCheckpointError for a pickle with a code payload, CannotAssess for an
    unsupported architecture or custom code, InputError for anything unreadable or a
    checkpoint that does not match its config.
    """
    torch_device = _check_device(device)
    label = describe(resolved)
    if resolved.gguf is not None:
        model, tokenizer, missing, unexpected = _load_gguf(resolved, raw_config, eager_attention, dtype, label)
        stored = list(resolved.gguf.tensor_types)
        classifier = pooling = None
        return _finish_load(model, classifier, pooling, tokenizer, resolved, torch_device, device, missing,
                            unexpected, {}, stored, for_scan)
    # An adapter: the base's weights, config and tokenizer, with the adapter merged in below.
    source = resolved.base or resolved
    if raw_config is None:
        raw_config = _read_config_json(source, label)

    # Weights first: an unsafe pickle is reported before anything else about the model.
    state_dict = load_state_dict(source.weight_files)
    adapter_weights = load_state_dict(resolved.weight_files) if resolved.base is not None else None
    check_config(raw_config)
    head = state_dict.get("lm_head.weight")
    head = head.to(dtype) if head is not None else None
    stored = sorted({str(t.dtype).replace("torch.", "") for t in state_dict.values() if t.is_floating_point()})
    # fp16 / bf16 files are computed in ``dtype`` (fp32 unless the caller chose the stored dtype).
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}

    quiet_transformers()
    classifier = pooling = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _load_config(source.local_dir, label)
        tokenizer = _load_tokenizer(source.local_dir, label)
        if for_scan and _names_a_classifier(raw_config):
            classifier, missing, unexpected = _build_classifier(config, state_dict, eager_attention, dtype, label)
        if classifier is not None:
            model = classifier.base_model
        else:
            model, missing, unexpected = _build_model(config, state_dict, eager_attention, dtype, label)
    del state_dict
    if adapter_weights is not None:
        from lmscan.models.adapter import merge_adapter  # noqa: PLC0415

        merged = merge_adapter(classifier or model, resolved.local_dir, adapter_weights, label)
        if classifier is not None:
            classifier, model = merged, merged.base_model
        else:
            model = merged
    skipped_sites = {}
    if for_scan:
        from lmscan.models.sentence import read_pooling  # noqa: PLC0415

        pooling, pooling_note = read_pooling(source.local_dir)
        if pooling_note:
            skipped_sites["embedding"] = pooling_note
    loaded = _finish_load(model, classifier, pooling, tokenizer, resolved, torch_device, device, missing,
                          unexpected, skipped_sites, stored, for_scan)
    if head is not None:
        loaded.lm_head = head.to(torch_device)
    return loaded


def _finish_load(model, classifier, pooling, tokenizer, resolved, torch_device, device, missing, unexpected,
                 skipped_sites, stored, for_scan) -> LoadedModel:
    """The architecture as loaded, the scan wrapper, eval mode on the device."""
    config = model.config
    missing_set = set(missing)
    loaded_keys = [k for k in (classifier or model).state_dict() if k not in missing_set]
    if getattr(model, "pooler", True) is None:  # e.g. RoBERTa classifiers build no pooler
        loaded_keys = [k for k in loaded_keys if ".pooler." not in f".{k}"]
    arch = identify(config, loaded_keys, head=classifier is not None, embedding=pooling is not None)
    labels = _label_names(config) if classifier is not None else None

    if for_scan:
        from lmscan.models.scan_model import ScanModel  # noqa: PLC0415

        model = ScanModel(model, classifier, pooling)
    model.eval()
    model.requires_grad_(False)
    try:
        model.to(torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"cannot move the model to device {device!r}: {_first_line(exc)}") from None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        arch=arch,
        resolved=resolved,
        device=torch_device,
        missing_keys=sorted(missing),
        unexpected_keys=sorted(unexpected),
        labels=labels,
        pooling=pooling.describe() if pooling is not None else None,
        skipped_sites=skipped_sites,
        stored_dtypes=stored,
    )


def _load_gguf(resolved, raw_config: dict | None, eager_attention: bool, dtype: torch.dtype, label: str):
    """(base model, tokenizer, missing keys, unexpected keys) of the GGUF file of ``resolved``.

    transformers dequantises the tensors with the gguf package (numpy, no code from the
    file) and maps llama.cpp's tensor names onto its own; the tokenizer is rebuilt from the
    vocabulary in the metadata."""
    from transformers import MODEL_MAPPING, AutoConfig, AutoTokenizer  # noqa: PLC0415

    from lmscan.models.gguf_file import gguf_config, require_gguf  # noqa: PLC0415

    require_gguf()
    info, folder = resolved.gguf, str(resolved.local_dir)
    if raw_config is None:
        raw_config = gguf_config(resolved.local_dir, info)
    check_config(raw_config)
    quiet_transformers()
    settings = {k: v for k, v in raw_config.items() if k != "model_type"}
    # The config already read from the metadata: the weights load reads the file once more, not twice.
    config = AutoConfig.for_model(raw_config["model_type"], **settings)
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        raise CannotAssess(f"{label}: transformers has no base model for {config.model_type!r}") from None
    kwargs = {"gguf_file": info.file, "config": config, "local_files_only": True, "trust_remote_code": False,
              "output_loading_info": True, dtype_keyword(): dtype}
    if eager_attention:
        kwargs["attn_implementation"] = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=info.file, local_files_only=True,
                                                      trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - a vocabulary transformers cannot rebuild
            raise InputError(f"{label}: cannot rebuild the tokenizer from the GGUF metadata "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
        try:
            # transformers draws its own tqdm bar while dequantising; stderr is lmscan's progress line.
            with contextlib.redirect_stderr(io.StringIO()):
                model, loading = model_cls.from_pretrained(folder, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a tensor table that does not fit the metadata
            raise InputError(f"{label}: the GGUF tensors do not load ({type(exc).__name__}: {_first_line(exc)})") \
                from None
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(k for k in loading.get("missing_keys") or [] if k not in buffers)
    if missing:
        raise InputError(f"{label}: the GGUF file lacks {len(missing)} weight(s) of its architecture "
                         f"(e.g. {missing[0]})")
    return model, tokenizer, missing, sorted(loading.get("unexpected_keys") or [])


def _names_a_classifier(raw_config: dict) -> bool:
    names = raw_config.get("architectures") or []
    return isinstance(names, list) and any(isinstance(n, str) and n.endswith("ForSequenceClassification")
                                           for n in names)


def _label_names(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    count = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]


def _build_classifier(config, state_dict: dict, eager_attention: bool, dtype: torch.dtype, label: str):
    """The checkpoint's sequence-classification model, when its head weights are really there
    (a config may name the class while the file holds only the encoder); else (None, ...)."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING  # noqa: PLC0415

    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None)
    if cls is None:
        return None, [], []
    prefix = f"{cls.base_model_prefix}."
    head_keys = [k for k in state_dict if not k.startswith(prefix) and not k.startswith("pooler.")
                 and not k.startswith(("embeddings.", "encoder.", "transformer."))]
    if not head_keys:
        return None, [], []
    model, missing, unexpected = _from_state_dict(cls, config, state_dict, eager_attention, dtype, label)
    head_missing = [k for k in missing if not k.startswith(prefix)]
    if head_missing:
        return None, [], []
    return model, missing, unexpected


def describe(resolved: ResolvedModel) -> str:
    """A short name for messages: the Hub id, or the local folder."""
    if resolved.kind == "hub" and resolved.repo_id:
        return resolved.repo_id + (f"@{resolved.commit[:12]}" if resolved.commit else "")
    if resolved.kind == "bundled":
        return "the bundled MiniLM model"
    return str(resolved.local_dir)


# --- pieces ------------------------------------------------------------------------------------


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"invalid device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available in this PyTorch build/machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"device {device!r} requested but MPS is not available")
    return dev


def _read_config_json(resolved: ResolvedModel, label: str) -> dict:
    path = resolved.local_dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{label}: no config.json in {resolved.local_dir}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InputError(f"{label}: config.json is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{label}: config.json is not a JSON object")
    return data


def quiet_transformers() -> None:
    """No progress bars, no load reports or advice on stderr: lmscan reports for itself."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _load_config(model_dir: Path, label: str):
    from transformers import AutoConfig  # noqa: PLC0415

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except ValueError as exc:
        text = str(exc)
        if "does not recognize this architecture" in text or "Unrecognized model" in text:
            raise CannotAssess(
                f"{label}: this version of transformers cannot build its architecture ({_first_line(exc)})"
            ) from None
        raise InputError(f"{label}: cannot read config.json ({_first_line(exc)})") from None
    except Exception as exc:
        raise InputError(f"{label}: cannot read config.json ({_first_line(exc)})") from None


def _load_tokenizer(model_dir: Path, label: str):
    from transformers import AutoTokenizer  # noqa: PLC0415

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{label}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            "lmscan needs the model's tokenizer next to its weights"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{label}: cannot load the tokenizer ({type(exc).__name__}: {_first_line(exc)})") from None
    if tokenizer is None or isinstance(tokenizer, bool):
        raise InputError(f"{label}: cannot load the tokenizer")
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    if len(tokenizer) <= len(specials) + 1:
        raise InputError(f"{label}: the tokenizer files hold no vocabulary")
    return tokenizer


def dtype_keyword() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers  # noqa: PLC0415
    from packaging.version import Version  # noqa: PLC0415

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _build_model(config, state_dict: dict, eager_attention: bool, dtype: torch.dtype, label: str):
    """Instantiate the base model from ``config`` and copy ``state_dict`` in.

    ``from_pretrained(None, config=..., state_dict=...)`` reads no files at all; it
    strips a task-head prefix (``bert.``, ``transformer.``), applies transformers' own
    key renames and reports missing, unexpected and mis-shaped tensors.
    """
    from transformers import MODEL_MAPPING  # noqa: PLC0415

    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        raise CannotAssess(f"{label}: transformers has no base model for {config.model_type!r}") from None
    return _from_state_dict(model_cls, config, state_dict, eager_attention, dtype, label)


def _from_state_dict(model_cls, config, state_dict: dict, eager_attention: bool, dtype: torch.dtype, label: str):
    kwargs: dict[str, Any] = {
        "config": config,
        "state_dict": state_dict,
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,
        dtype_keyword(): dtype,
    }
    if eager_attention:
        kwargs["attn_implementation"] = "eager"
    try:
        model, info = model_cls.from_pretrained(None, **kwargs)
    except Exception as exc:
        raise InputError(
            f"{label}: the weights do not fit the architecture in config.json ({type(exc).__name__}: "
            f"{_first_line(exc)})"
        ) from None

    mismatched = [m[0] if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or []]
    if mismatched:
        raise InputError(
            f"{label}: the checkpoint does not match its config: {len(mismatched)} tensor(s) have the wrong shape "
            f"(e.g. {sorted(mismatched)[0]})"
        )
    errors = [str(e) for e in info.get("error_msgs") or []]
    if errors:
        raise InputError(f"{label}: the weights could not be loaded ({_first_line(errors[0])})")

    buffers = {name for name, _ in model.named_buffers()}
    missing = set(info.get("missing_keys") or [])
    core_missing = sorted(k for k in missing if k not in buffers and not _is_pooler_key(k))
    if core_missing:
        raise InputError(
            f"{label}: the checkpoint does not match its config: {len(core_missing)} weight(s) missing "
            f"(e.g. {core_missing[0]})"
        )
    reported_missing = sorted(k for k in missing if k not in buffers)
    return model, reported_missing, sorted(set(info.get("unexpected_keys") or []))


def _is_pooler_key(key: str) -> bool:
    return key.startswith("pooler.") or ".pooler." in key


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else getattr(type(exc), "__name__", "error")
