"""Export a lowbit model to one GGUF file that llama.cpp runs.

Quantized layers are written as the ggml block type of their own size that holds them (ggml_blocks.py:
UniformQ 4-bit sym -> Q4_0 and 8-bit sym -> Q8_0 exactly, groups of any multiple of 32; 4-bit asym g32
-> Q4_1 with m rounded to fp16). Any other layer (UniformQ of other bits, groups or zero points,
CodebookQ) goes to the K-quant of its bits (2 -> Q2_K ... 6 -> Q6_K; 8 -> Q8_0), fitted to the layer's
dequantized weights by our own packer (kquants.py; weighted by the calibration importance of each
input column when the caller has it); so is an act-order layer (its groups scattered over the
input: act_order.InputOrder). Rows that are not whole 256-weight super-blocks take the type
llama.cpp's llama-quantize falls back to (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0),
written exactly when the layer's integer grid fits it (UniformQ of 2/3 bits in Q4_0, 4-bit asym in
Q5_0, ggml_blocks.holds), else fitted by ggml's reference quantizer (the `gguf` package's). Each
tensor's conversion error (relative squared error against the layer's own weights; 0 when exact) is
reported on request (`lowbit export --report`: a Markdown table written beside the file, so what a
refit cost is on record next to what it produced). Float tensors keep their dtype (norms always F32,
as llama.cpp wants them).
Names and row layouts: gguf_arch.py.

Metadata: the architecture's hyperparameters from the model's config, as convert_hf_to_gguf.py writes
them; the tokenizer (and chat template, and general.* names) copied field by field from the source
GGUF when the model came from one, else built from a byte-level BPE tokenizer (GPT-2 style: tokens,
types, merges, special ids, chat template). The file is written beside its destination and renamed
into place when complete (atomic.atomic_file): an interrupted export leaves nothing.
"""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..atomic_file import atomic_write_text
from ..errors import LowbitError
from .act_order import InputOrder
from .atomic import atomic_file
from .foreign import check_weight_only
from .ggml_blocks import ggml_type, holds, to_blocks
from .kquants import BY_BITS, KINDS, QK_K
from .kquants import quantize as kquantize
from .gguf_arch import HEAD_IS_EMBEDDING, NORM_SHIFT, arch_of, gguf_name, row_order
from .save import shared_modules

_FLOAT_TYPES = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
                torch.bfloat16: gguf.GGMLQuantizationType.BF16}
GGML = gguf.GGMLQuantizationType
_FILE_TYPES = {GGML.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, GGML.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               GGML.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, GGML.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
               GGML.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, GGML.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
               GGML.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, GGML.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
               GGML.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, GGML.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}
FALLBACK = {GGML.Q2_K: GGML.Q4_0, GGML.Q3_K: GGML.Q4_0, GGML.Q4_K: GGML.Q5_0, GGML.Q5_K: GGML.Q5_1,
            GGML.Q6_K: GGML.Q8_0}  # llama-quant.cpp's tensor_type_fallback, for rows not a multiple of 256
_COPIED = ("tokenizer.", "general.name", "general.basename", "general.finetune", "general.size_label",
           "general.organization", "general.license", "general.languages")


def _float_array(t: torch.Tensor) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A float tensor in its own dtype (1-D ones, norms and biases, in F32 as llama.cpp wants them)."""
    t = t.detach().float() if t.dim() == 1 or t.dtype not in _FLOAT_TYPES else t.detach()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), gguf.GGMLQuantizationType.BF16
    return t.numpy(), None


def model_tensors(model: torch.nn.Module) -> dict[str, object]:
    """transformers tensor name -> QTensor (quantized weights) or float tensor, each stored once: a
    head sharing its embedding's tensors (tied) is left out, as llama.cpp reads it from token_embd."""
    check_weight_only(model)
    shared = shared_modules(model)
    out = {}
    for name, module in model.named_modules():
        if name in shared:
            continue
        if hasattr(module, "qtensor"):
            perm = getattr(module, "in_perm", None)
            out[f"{name}.weight"] = module.qtensor if perm is None else InputOrder(module.qtensor, perm)
            if getattr(module, "bias", None) is not None:
                out[f"{name}.bias"] = module.bias
    for name, p in model.named_parameters():  # tied float parameters appear once
        out.setdefault(name, p)
    return out


@dataclass(frozen=True)
class Converted:
    """One quantized tensor of an export: its lowbit format, the GGUF type it went to, and the
    conversion's relative squared error ‖ŵ − w‖² / ‖w‖² against the layer's own weights (0: exact)."""
    name: str
    format: str
    gguf_type: str
    rel_err: float


def report_path(gguf_file: str | Path) -> Path:
    """Where the conversion report of the GGUF file `gguf_file` is written: beside it."""
    gguf_file = Path(gguf_file)
    return gguf_file.with_name(gguf_file.name + ".report.md")


def report_table(report: list[Converted]) -> str:
    """The conversions as a Markdown table, one row per quantized tensor: "exact" where the GGUF type
    holds the layer's own values, else the relative squared error of the refit."""
    rows = ["| layer | lowbit format | GGUF type | conversion error |", "|---|---|---|---|"]
    rows += [f"| {c.name} | {c.format} | {c.gguf_type} | {'exact' if c.rel_err == 0 else f'{c.rel_err:.3e}'} |"
             for c in report]
    return "\n".join(rows) + "\n"


def write_report(gguf_file: str | Path, report: list[Converted]) -> Path:
    """The report table written atomically beside `gguf_file` (report_path); its path."""
    out = report_path(gguf_file)
    atomic_write_text(out, report_table(report))
    return out


def gguf_type(qt) -> GGML:
    """The type a QTensor is written as: the ggml type of its own size that holds it, else the K-quant
    of its bits (8: Q8_0), or llama.cpp's fallback for rows that are not whole super-blocks."""
    exact = ggml_type(qt)
    if exact is not None:
        return exact
    target = BY_BITS.get(qt.bits, GGML.Q8_0)
    return FALLBACK.get(target, target) if qt.shape[1] % QK_K else target


def _quantized(hf_name: str, qt, importance: torch.Tensor | None, report: list | None) -> tuple[np.ndarray, GGML]:
    """`qt` as GGUF blocks and their type; the conversion appended to `report` (when given)."""
    qtype, values = gguf_type(qt), None
    if holds(qt, qtype):
        array = to_blocks(qt, qtype)[0]
        if qtype != GGML.Q4_1:  # exact
            values = False
    elif qtype in KINDS:
        array, values = kquantize(qt.dequantize(), qtype, importance)
    else:
        array = gguf.quants.quantize(qt.dequantize().numpy(), qtype)
    if report is not None:
        err = 0.0
        if values is not False:
            w = qt.dequantize()
            values = torch.from_numpy(gguf.quants.dequantize(array, qtype)) if values is None else values
            err = float((values - w).square().sum() / w.square().sum().clamp(min=torch.finfo(torch.float32).tiny))
        report.append(Converted(hf_name[:-len(".weight")], qt.describe(qt.meta()), qtype.name, err))
    return array, qtype


def _encode(config, hf_name: str, value, importance: torch.Tensor | None,
            report: list | None) -> tuple[np.ndarray, GGML | None]:
    """(array, raw ggml type or None for a float array), rows in GGUF's order."""
    if isinstance(value, torch.Tensor):
        if NORM_SHIFT.get(config.model_type) and hf_name.endswith("norm.weight"):
            value = value.detach().float() + NORM_SHIFT[config.model_type]
        array, qtype = _float_array(value)
    else:
        array, qtype = _quantized(hf_name, value, importance, report)
    order = row_order(config, hf_name, array.shape[0])
    if order is not None:
        array = array[order.numpy()]
    return np.ascontiguousarray(array), qtype


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LowbitError(f"GGUF export does not write rope scaling '{rope.get('rope_type')}' yet")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hyperparameters(w: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)


def _copy_fields(w: gguf.GGUFWriter, source: Path) -> None:
    """The source GGUF's tokenizer.* fields (vocabulary, merges, special ids, chat template) and names."""
    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith(_COPIED):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)


def _tokenizer_fields(w: gguf.GGUFWriter, tokenizer, size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, what llama.cpp calls 'gpt2') as GGUF fields: `size`
    tokens, the model's vocabulary (ids the tokenizer lacks are unused; ids past the embedding, which
    the model cannot read, are left out)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise LowbitError("GGUF export of a model from a Hugging Face directory needs a byte-level BPE tokenizer "
                          "(GPT-2 style); export a model quantized from a GGUF source, or convert with llama.cpp")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if token in added
                     else gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None and getattr(tokenizer, attr) < size:
            add(getattr(tokenizer, attr))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)


def write_gguf(model: torch.nn.Module, out: str | Path, tokenizer=None, source_gguf: Path | None = None,
               overwrite: bool = False, importance: dict[str, torch.Tensor] | None = None,
               report: list | None = None) -> Path:
    """Write `model` (transformers, lowbit-quantized) as the GGUF file `out`, atomically; tokenizer
    fields from `source_gguf` when given, else from `tokenizer`. `importance`: module name -> [K]
    weights of its input columns (calibration statistics, diag(XXᵀ)) for the layers fitted to a
    K-quant; `report`: a list to which each quantized tensor's Converted is appended."""
    config = model.config
    arch = arch_of(config)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    importance = importance or {}
    arrays = {gguf_name(names, n): (n, *_encode(config, n, v, importance.get(n[:-len(".weight")]), report))
              for n, v in model_tensors(model).items()}
    if arch in HEAD_IS_EMBEDDING and "output.weight" in arrays:
        raise LowbitError(f"{config.model_type} in GGUF reads its output head from the token embedding: "
                          "quantize the head and the embedding with one spec (they are then stored once)")
    kinds = Counter(qtype for _, _, qtype in arrays.values() if qtype in _FILE_TYPES)
    if not kinds:
        raise LowbitError("model has no quantized layers: quantize it first")
    if source_gguf is None and tokenizer is None:
        raise LowbitError("GGUF export needs the model's tokenizer")
    out = Path(out)
    with atomic_file(out, overwrite) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _hyperparameters(w, config)
        w.add_file_type(_FILE_TYPES[kinds.most_common(1)[0][0]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source_gguf is not None:
            _copy_fields(w, source_gguf)
        else:
            _tokenizer_fields(w, tokenizer, config.vocab_size)
        for name, (_, array, qtype) in arrays.items():
            w.add_tensor(name, array, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
