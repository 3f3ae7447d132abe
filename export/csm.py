"""Exporter for CSM checkpoints (Sesame CSM-1B architecture) -> Triton repository entries.

``python -m export csm --checkpoint DIR_OR_ID --name NAME`` loads a
``CsmForConditionalGeneration`` with transformers and instantiates the
template folder ``model_repository/csm_template/`` for model id ``NAME``:

* ``NAME_mimi_encoder``, ``NAME_backbone``, ``NAME_depth``,
  ``NAME_mimi_decoder``: the ONNX graphs of :mod:`export.csm_graphs`, all
  from ``csm_template/network`` (the python-backend onnxruntime model on
  ``--target cpu``, the ``onnxruntime_onnx`` platform on ``gpu``,
  ``tensorrt_plan`` engines with ``--tensorrt``);
* ``NAME_prompt`` (python: segments -> frames, ``csm_template/prompt``) and
  ``NAME_generator`` (python BLS: the frame loop, ``csm_template/generator``);
* ``NAME``: the ensemble decoder chaining prompt -> generator -> Mimi decoder
  (``csm_template/ensemble``).

``--precision fp16|bf16`` casts the weights; every graph still takes and
returns FP32 tensors (cast at the graph boundary), so the python models and the
handler are the same for every precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from export.csm_graphs import (
    backbone_module,
    depth_module,
    mimi_decoder_module,
    mimi_encoder_module,
)
from export.onnx_export import export_onnx
from export.repository import (
    COMMON,
    SOURCE_REPOSITORY,
    ExportOptions,
    export_entry,
    place_onnxruntime_model,
    progress,
    sha256_of_file,
    source_digests,
    write_atomic,
    write_model,
)

TEMPLATE = SOURCE_REPOSITORY / "csm_template"
PRECISIONS = ("fp32", "fp16", "bf16")
_EXPORTER_FILES = ("csm.py", "csm_graphs.py", "onnx_export.py")


@dataclass(frozen=True, kw_only=True)
class CsmExportOptions(ExportOptions):
    """Options of ``python -m export csm`` (``out`` and ``target``: :class:`ExportOptions`).

    Attributes:
        checkpoint: transformers ``CsmForConditionalGeneration`` directory (or a
            hub id where a hub is reachable).
        name: the model id served by the API; the models are ``name`` and
            ``name_<role>``.
        precision: weight precision, one of :data:`PRECISIONS`.
        tensorrt: build TensorRT engines (needs a CUDA GPU).

    Raises:
        ValueError: unknown target or precision, or a name that is not a valid model id.
    """

    checkpoint: str
    name: str = "csm"
    precision: str = "fp32"
    tensorrt: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}")
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"--name {self.name!r}: letters, digits, '-', '_' and '.' only")


@dataclass(frozen=True)
class _Graph:
    """One exported graph: its role, module, example inputs and tensor contract."""

    role: str
    module: Any
    example: tuple[Any, ...]
    inputs: list[tuple[str, str, str]]
    outputs: list[tuple[str, str, str]]
    dynamic: dict[str, dict[int, Any]]
    optimize: bool = True


def _io_block(inputs: list[tuple[str, str, str]], outputs: list[tuple[str, str, str]]) -> str:
    def rows(tensors: list[tuple[str, str, str]]) -> str:
        return ",\n".join(
            f'  {{ name: "{name}" data_type: {dtype} dims: {dims} }}'
            for name, dtype, dims in tensors
        )

    return f"input [\n{rows(inputs)}\n]\noutput [\n{rows(outputs)}\n]"


def _warmup_block(graph: _Graph) -> str:
    """A Triton ``model_warmup`` running the graph once on zeros at its example shapes."""
    rows = "\n".join(
        f'  inputs {{ key: "{name}" value {{ data_type: {dtype} '
        f'dims: [ {", ".join(str(d) for d in example.shape)} ] zero_data: true }} }}'
        for (name, dtype, _), example in zip(graph.inputs, graph.example, strict=True)
    )
    return f'model_warmup [{{\n  name: "zeros"\n  batch_size: 1\n{rows}\n}}]'


def _boundary_cast(module: Any, dtype: Any) -> Any:
    """Wrap ``module`` so FP32 inputs are cast to ``dtype`` and float outputs back to FP32."""
    import torch

    if dtype == torch.float32:
        return module

    class BoundaryCast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: Any) -> Any:
            cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
            out = self.inner(*cast)
            outs = out if isinstance(out, tuple) else (out,)
            back = tuple(o.float() if o.is_floating_point() else o for o in outs)
            return back if isinstance(out, tuple) else back[0]

    return BoundaryCast().eval()


def _graphs(model: Any) -> list[_Graph]:
    """The four graphs with example inputs, Triton tensor types and dynamic dimensions."""
    import torch

    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = config.head_dim
    codebooks, vocab, hidden = config.num_codebooks, config.vocab_size, config.hidden_size
    max_seq = config.max_position_embeddings
    frame_samples = _frame_samples(model)
    dim = torch.export.Dim
    positions = dim("positions", min=1, max=max_seq)
    past = dim("past", min=0, max=max_seq)
    frames = dim("frames", min=1, max=max_seq)
    cache = f"[ {layers}, 1, {kv_heads}, -1, {head_dim} ]"
    columns = codebooks + 1
    text_mask = torch.zeros(1, 4, columns, dtype=torch.bool)
    text_mask[..., codebooks] = True
    return [
        _Graph(
            "mimi_encoder",
            mimi_encoder_module(model),
            (torch.zeros(1, 1, frame_samples * 4),),
            [("audio", "TYPE_FP32", "[ 1, 1, -1 ]")],
            [("audio_codes", "TYPE_INT64", f"[ 1, {codebooks}, -1 ]")],
            {
                "audio": {
                    2: dim("samples", min=frame_samples, max=max_seq * frame_samples)
                }
            },
        ),
        _Graph(
            "backbone",
            backbone_module(model),
            (
                torch.ones(1, 4, columns, dtype=torch.int64),
                text_mask,
                torch.zeros(layers, 1, kv_heads, 2, head_dim),
                torch.zeros(layers, 1, kv_heads, 2, head_dim),
            ),
            [
                ("frames", "TYPE_INT64", f"[ 1, -1, {columns} ]"),
                ("frame_mask", "TYPE_BOOL", f"[ 1, -1, {columns} ]"),
                ("past_keys", "TYPE_FP32", cache),
                ("past_values", "TYPE_FP32", cache),
            ],
            [
                ("codebook0_logits", "TYPE_FP32", f"[ 1, {vocab} ]"),
                ("last_hidden", "TYPE_FP32", f"[ 1, {hidden} ]"),
                ("present_keys", "TYPE_FP32", cache),
                ("present_values", "TYPE_FP32", cache),
            ],
            {
                "frames": {1: positions},
                "frame_mask": {1: positions},
                "past_keys": {3: past},
                "past_values": {3: past},
            },
        ),
        _Graph(
            "depth",
            depth_module(model),
            (
                torch.zeros(1, hidden),
                torch.zeros(1, dtype=torch.int64),
                torch.zeros(1),
                torch.ones(1, dtype=torch.int64),
                torch.full((codebooks - 1, vocab), 0.5),
            ),
            [
                ("last_hidden", "TYPE_FP32", f"[ 1, {hidden} ]"),
                ("codebook0", "TYPE_INT64", "[ 1 ]"),
                ("temperature", "TYPE_FP32", "[ 1 ]"),
                ("top_k", "TYPE_INT64", "[ 1 ]"),
                ("uniform_noise", "TYPE_FP32", f"[ {codebooks - 1}, {vocab} ]"),
            ],
            [("codebooks", "TYPE_INT64", f"[ 1, {codebooks - 1} ]")],
            {},
            # The unrolled depth loop makes onnxscript's optimizer the slowest
            # step by far; onnxruntime optimises the graph at load anyway.
            optimize=False,
        ),
        _Graph(
            "mimi_decoder",
            mimi_decoder_module(model),
            (torch.zeros(1, codebooks, 4, dtype=torch.int64), torch.tensor([codebooks])),
            [
                ("audio_codes", "TYPE_INT64", f"[ 1, {codebooks}, -1 ]"),
                ("num_quantizers", "TYPE_INT64", "[ 1 ]"),
            ],
            [("audio", "TYPE_FP32", "[ 1, 1, -1 ]")],
            {"audio_codes": {2: frames}, "num_quantizers": {}},
        ),
    ]


def _frame_samples(model: Any) -> int:
    """Audio samples per Mimi frame (1,920 at 24 kHz / 12.5 Hz)."""
    codec = model.config.codec_config
    return round(codec.sampling_rate / codec.frame_rate)


def _export_graph(graph: _Graph, dtype: Any, directory: Path) -> list[Path]:
    """Export one graph, cast at its boundary to ``dtype``, into ``directory/1/``."""
    module = _boundary_cast(graph.module, dtype)
    # By position; the precision wrapper's ``forward(*args)`` nests them once more.
    shapes: Any = tuple(graph.dynamic.get(name) or None for name, _, _ in graph.inputs)
    if module is not graph.module:
        shapes = (shapes,)
    return export_onnx(
        module,
        graph.example,
        directory / "1",
        [name for name, _, _ in graph.inputs],
        [name for name, _, _ in graph.outputs],
        shapes,
        optimize=graph.optimize,
    )


def _load(options: CsmExportOptions) -> tuple[Any, Any, Any]:
    import torch
    from transformers import AutoTokenizer, CsmForConditionalGeneration

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        options.precision
    ]
    model = CsmForConditionalGeneration.from_pretrained(
        options.checkpoint, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.checkpoint)
    return model.to(dtype), tokenizer, dtype


def _source_fingerprint(checkpoint: str) -> dict[str, Any]:
    path = Path(checkpoint)
    if not path.is_dir():
        return {"hub_id": checkpoint}
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {
        "directory": str(path.resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def export_csm(
    options: CsmExportOptions,
    build_engine: Callable[[Path, Path, dict[str, dict[int, Any]], Any], None] | None = None,
) -> bool:
    """Export a CSM checkpoint into ``options.out`` under the model id ``options.name``.

    ``build_engine(onnx_path, plan_path, dynamic, graph_example)`` turns one ONNX
    file into a TensorRT plan (:func:`export.tensorrt.build_engine` unless given).

    Returns:
        True when files were written, False when the manifest says they are current.

    Raises:
        RuntimeError: ``--tensorrt`` without TensorRT or a CUDA GPU.
    """
    if not options.tensorrt:
        build_engine = None
    elif build_engine is None:
        from export.tensorrt import build_engine as default_build
        from export.tensorrt import require_gpu

        require_gpu()
        build_engine = default_build
    inputs = {
        "source": _source_fingerprint(options.checkpoint),
        "target": options.target,
        "precision": options.precision,
        "tensorrt": options.tensorrt,
        "packages": {n: metadata.version(n) for n in ("torch", "transformers")},
        "sources": source_digests(TEMPLATE, COMMON),
        "exporter": [sha256_of_file(Path(__file__).with_name(n)) for n in _EXPORTER_FILES],
    }
    shapes: dict[str, Any] = {}
    return export_entry(
        options.out,
        f"csm:{options.name}",
        inputs,
        lambda: _write(options, build_engine, shapes),
        details={"shapes": shapes},
        label=options.name,
    )


def _write(
    options: CsmExportOptions,
    build_engine: Callable[[Path, Path, dict[str, dict[int, Any]], Any], None] | None,
    shapes: dict[str, Any],
) -> list[Path]:
    """Write every model of the checkpoint; fill ``shapes`` (recorded in the manifest)."""
    progress(f"{options.name}: loading {options.checkpoint} with transformers")
    model, tokenizer, dtype = _load(options)
    config = model.config
    name, root = options.name, options.out
    outputs: list[Path] = []
    variant = "tensorrt" if build_engine is not None else options.target
    for graph in _graphs(model):
        directory = root / f"{name}_{graph.role}"
        progress(f"{name}: exporting {graph.role} to ONNX")
        written = _export_graph(graph, dtype, directory)
        if build_engine is not None:
            progress(f"{name}: building the TensorRT engine for {graph.role}")
            plan = directory / "1" / "model.plan"
            build_engine(written[0], plan, graph.dynamic, graph.example)
            outputs.append(plan)
        else:
            outputs += written
        outputs += write_model(
            TEMPLATE / "network",
            directory,
            variant,
            model_name=directory.name,
            role=graph.role.replace("_", " "),
            io=_io_block(graph.inputs, graph.outputs),
            warmup=_warmup_block(graph),
        )
        if variant == "cpu":
            outputs += place_onnxruntime_model(directory)

    progress(f"{name}: writing the prompt builder, generator and ensemble")
    prompt_dir, generator_dir = root / f"{name}_prompt", root / f"{name}_generator"
    tokenizer_path = prompt_dir / "1" / "tokenizer.json"
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(tokenizer_path, lambda tmp: tokenizer.backend_tokenizer.save(str(tmp)))
    values = {
        "columns": config.num_codebooks + 1,
        "num_codebooks": config.num_codebooks,
        "max_seq_len": config.max_position_embeddings,
    }
    outputs += [
        tokenizer_path,
        *write_model(
            TEMPLATE / "prompt",
            prompt_dir,
            model_name=prompt_dir.name,
            encoder=f"{name}_mimi_encoder",
            frame_samples=_frame_samples(model),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **values,
        ),
        *write_model(
            TEMPLATE / "generator",
            generator_dir,
            model_name=generator_dir.name,
            backbone=f"{name}_backbone",
            depth=f"{name}_depth",
            num_layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            **values,
        ),
        *write_model(
            TEMPLATE / "ensemble",
            root / name,
            model_name=name,
            prompt=prompt_dir.name,
            generator=generator_dir.name,
            decoder=f"{name}_mimi_decoder",
            display_name=f"CSM ({Path(options.checkpoint).name}, {options.precision})",
            sample_rate=config.codec_config.sampling_rate,
            frame_samples=_frame_samples(model),
            **values,
        ),
    ]
    shapes.update(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_codebooks=config.num_codebooks,
        vocab_size=config.vocab_size,
        max_seq_len=config.max_position_embeddings,
    )
    return outputs
