"""Exporter for CSM checkpoints (Sesame CSM-1B architecture) -> Triton repository entries.

``python -m export csm --checkpoint DIR_OR_ID --name NAME`` loads a
``CsmForConditionalGeneration`` with transformers and instantiates the
template folder ``model_repository/csm_template/`` for model id ``NAME``:

* ``NAME_mimi_encoder``, ``NAME_backbone``, ``NAME_depth``,
  ``NAME_mimi_decoder``: the ONNX graphs of :mod:`export.csm_graphs`, all
  from ``csm_template/network`` (the python-backend onnxruntime model on
  ``--target cpu``, the ``onnxruntime_onnx`` platform on ``gpu``,
  ``tensorrt_plan`` engines with ``--tensorrt``: only ``model.plan`` in the
  version folder, the ONNX graph it was built from stays in a scratch folder);
* ``NAME_prompt`` (python: segments -> frames, ``csm_template/prompt``) and
  ``NAME_generator`` (python BLS: the frame loop, ``csm_template/generator``);
* ``NAME``: the ensemble decoder chaining prompt -> generator -> Mimi decoder
  (``csm_template/ensemble``).

``--precision fp16|bf16`` casts the weights; every graph still takes and
returns FP32 tensors (cast at the graph boundary), so the python models and the
handler are the same for every precision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    checkpoint_directory,
    export_entry,
    exporter_digests,
    place_onnxruntime_model,
    progress,
    source_digests,
    write_atomic,
    write_model,
)
from export.tensorrt import PLAN_NAME, TENSORRT_VERSION, Profile

if TYPE_CHECKING:
    from handler.engines.base import ParamRule

# Builds one engine: (onnx_path, plan_path, profiles); export.tensorrt.build_engine by default.
EngineBuilder = Callable[[Path, Path, Sequence[Profile]], None]

TEMPLATE = SOURCE_REPOSITORY / "csm_template"
PRECISIONS = ("fp32", "fp16", "bf16")
_EXPORTER_FILES = ("csm.py", "csm_graphs.py", "onnx_export.py")
# Positions of a prompt that hold no audio of a history clip, at the least
# (docs/csm.md, "Prompt"): the clip's EOS frame, and the BOS and EOS frames of
# the clip's own turn and of the open turn.
_PROMPT_FRAMES_BESIDE_A_CLIP = 1 + 2 + 2


@dataclass(frozen=True, kw_only=True)
class CsmExportOptions(ExportOptions):
    """Options of ``python -m export csm`` (``out`` and ``target``: :class:`ExportOptions`).

    Attributes:
        checkpoint: transformers ``CsmForConditionalGeneration`` directory on this
            machine (a hub is never asked).
        name: the model id served by the API; the models are ``name`` and
            ``name_<role>``.
        precision: weight precision, one of :data:`PRECISIONS`.
        tensorrt: build TensorRT engines (needs a CUDA GPU).

    Raises:
        ValueError: unknown target or precision, a name that is not a valid model
            id, or a checkpoint that is not a local transformers directory.
    """

    checkpoint: str
    name: str = "csm"
    precision: str = "fp32"
    tensorrt: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checkpoint_directory(self.checkpoint)
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


def _warmup_block(graph: _Graph, profiles: Sequence[Profile] = ()) -> str:
    """A Triton ``model_warmup`` running the graph on zeros once per profile, else once.

    Each sample uses a profile's opt shapes (so every TensorRT execution
    context runs before the model is ready); inputs a profile does not name,
    and the single sample of a graph without profiles, use the example shapes.
    """
    examples = {name: tuple(example.shape) for (name, _, _), example in
                zip(graph.inputs, graph.example, strict=True)}
    samples = [(f"zeros_{p.name}", examples | p.opt_shapes()) for p in profiles]
    entries = []
    for label, shapes in samples or [("zeros", examples)]:
        rows = "\n".join(
            f'  inputs {{ key: "{name}" value {{ data_type: {dtype} '
            f'dims: [ {", ".join(str(d) for d in shapes[name])} ] zero_data: true }} }}'
            for name, dtype, _ in graph.inputs
        )
        entries.append(f'{{\n  name: "{label}"\n  batch_size: 1\n{rows}\n}}')
    return f"model_warmup [{', '.join(entries)}]"


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


def _new_frames_rule(model: Any) -> ParamRule:
    """The API's ``max_new_tokens`` rule for this checkpoint (a ``ParamRule``, in frames).

    Read from :meth:`handler.engines.csm.CsmEngine.param_rules`, the rule the
    handler applies to requests, so the engines' shapes follow the API's limits.
    """
    from handler.engines.csm import CsmEngine

    config = model.config
    engine = CsmEngine(
        model_id="csm",
        sample_rate=config.codec_config.sampling_rate,
        num_codebooks=config.num_codebooks,
        speakers=[],
        max_seq_len=config.max_position_embeddings,
    )
    return next(rule for rule in engine.param_rules() if rule.name == "max_new_frames")


def tensorrt_profiles(model: Any) -> dict[str, list[Profile]]:
    """Optimization profiles per graph role, around the shapes requests really use.

    With S = ``max_position_embeddings`` and the handler's ``max_new_tokens``
    rule (frames: ``low`` 16, ``high`` 2,048, ``default`` 512; see
    :func:`_new_frames_rule`):

    * ``backbone``, two profiles (Triton picks the one that fits each call):
      ``prefill``: the whole prompt with an empty KV cache, T frames from 1
      to S - low (the prompt builder's budget with the smallest
      ``max_new_tokens``), opt S - default (the longest prompt of a request
      with the default, what a conversation with history fills), P = 0;
      ``decode``: one frame, KV cache length P from 1 to S - 1, opt
      S - default / 2 (halfway through a default reply after such a prompt).
    * ``mimi_decoder`` (called once per reply with all its frames): 1 to
      min(high, S - 1) frames, opt the default reply.
    * ``mimi_encoder`` (one history clip per call): from one frame of samples
      (the prompt builder pads shorter clips) to the longest clip a prompt can
      hold, S - low - 5 frames (the 5 positions of
      ``_PROMPT_FRAMES_BESIDE_A_CLIP``); the API's 25 MiB per turn allows
      longer clips, which the prompt builder leaves out. Opt: a clip as long
      as a default reply (spoken history is mostly earlier replies).
    * ``depth``: static shapes, no profile.

    Every opt is clamped into its [min, max] for checkpoints with a short S.

    Returns:
        ``{role: [Profile, ...]}`` for the four graph roles.
    """
    config = model.config
    layers, kv_heads, head_dim = (
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    )
    columns, codebooks = config.num_codebooks + 1, config.num_codebooks
    max_seq, frame_samples = config.max_position_embeddings, _frame_samples(model)
    rule = _new_frames_rule(model)
    if not isinstance(rule.default, int):  # the opt shapes need the API's default length
        raise RuntimeError("the handler's max_new_tokens rule has no default frame count")
    fewest_new, most_new, default_new = int(rule.low), int(rule.high), rule.default
    longest_prompt = max_seq - fewest_new
    longest_reply = min(most_new, max_seq - 1)
    longest_clip = longest_prompt - _PROMPT_FRAMES_BESIDE_A_CLIP

    def clamp(value: int, high: int) -> int:
        return max(1, min(value, high))

    def frames(t: int) -> tuple[int, ...]:
        return (1, t, columns)

    def cache(p: int) -> tuple[int, ...]:
        return (layers, 1, kv_heads, p, head_dim)

    def rows(low: int, opt: int, high: int, shape: Callable[[int], tuple[int, ...]]) -> Any:
        return shape(low), shape(opt), shape(high)

    prompt = rows(1, clamp(max_seq - default_new, longest_prompt), longest_prompt, frames)
    empty = rows(0, 0, 0, cache)
    one = rows(1, 1, 1, frames)
    history = rows(1, clamp(max_seq - default_new // 2, max_seq - 1), max_seq - 1, cache)
    return {
        "mimi_encoder": [
            Profile("history_clip", {"audio": rows(
                1, clamp(default_new, longest_clip), longest_clip,
                lambda n: (1, 1, n * frame_samples),
            )})
        ],
        "backbone": [
            Profile("prefill", {"frames": prompt, "frame_mask": prompt,
                                "past_keys": empty, "past_values": empty}),
            Profile("decode", {"frames": one, "frame_mask": one,
                               "past_keys": history, "past_values": history}),
        ],
        "depth": [],
        "mimi_decoder": [
            Profile("reply", {"audio_codes": rows(
                1, clamp(default_new, longest_reply), longest_reply,
                lambda n: (1, codebooks, n),
            )})
        ],
    }


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
        options.checkpoint, dtype=torch.float32, attn_implementation="eager",
        local_files_only=True,
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(options.checkpoint, local_files_only=True)
    return model.to(dtype), tokenizer, dtype


def _source_fingerprint(checkpoint: str) -> dict[str, Any]:
    path = Path(checkpoint)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {
        "directory": str(path.resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def export_csm(options: CsmExportOptions, build_engine: EngineBuilder | None = None) -> bool:
    """Export a CSM checkpoint into ``options.out`` under the model id ``options.name``.

    With ``options.tensorrt``, ``build_engine(onnx_path, plan_path, profiles)``
    turns each ONNX graph, exported into a scratch folder beside the repository,
    into a TensorRT plan (:func:`export.tensorrt.build_engine` unless given, after
    :func:`export.tensorrt.require_tensorrt`); the profiles are
    :func:`tensorrt_profiles`.

    Returns:
        True when files were written, False when the manifest says they are current.

    Raises:
        RuntimeError: ``--tensorrt`` without TensorRT :data:`TENSORRT_VERSION` or a
            CUDA GPU (raised before anything is written).
    """
    exporter_files: tuple[str, ...] = _EXPORTER_FILES
    if not options.tensorrt:
        build_engine = None
    elif build_engine is None:
        from export.tensorrt import build_engine as default_build
        from export.tensorrt import require_tensorrt

        require_tensorrt()
        build_engine = default_build
    if options.tensorrt:
        exporter_files += ("tensorrt.py",)
    inputs = {
        "source": _source_fingerprint(options.checkpoint),
        "target": options.target,
        "precision": options.precision,
        "tensorrt": TENSORRT_VERSION if options.tensorrt else False,
        "packages": {n: metadata.version(n) for n in ("torch", "transformers")},
        "sources": source_digests(TEMPLATE, COMMON),
        "exporter": exporter_digests(*exporter_files),
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


def _write_engines(
    model: Any, dtype: Any, options: CsmExportOptions, build_engine: EngineBuilder
) -> list[Path]:
    """Build the four graphs' TensorRT plans and configs; the ONNX files are not kept.

    Each graph is exported to ONNX in a scratch folder next to the repository
    (removed afterwards), so the model folders hold only ``model.plan`` and
    nothing but the engine is uploaded.

    Returns:
        The written plans and configs.
    """
    profiles = tensorrt_profiles(model)
    outputs: list[Path] = []
    root = options.out
    with tempfile.TemporaryDirectory(prefix=f".{root.name}-onnx-", dir=root.parent) as scratch:
        for graph in _graphs(model):
            directory = root / f"{options.name}_{graph.role}"
            progress(f"{options.name}: exporting {graph.role} to ONNX")
            onnx = _export_graph(graph, dtype, Path(scratch) / graph.role)[0]
            progress(f"{options.name}: building the TensorRT engine for {graph.role}")
            plan = directory / "1" / PLAN_NAME
            build_engine(onnx, plan, profiles[graph.role])
            numbers = ", ".join(f'"{index}"' for index in range(len(profiles[graph.role])))
            outputs.append(plan)
            outputs += write_model(
                TEMPLATE / "network",
                directory,
                "tensorrt",
                model_name=directory.name,
                role=graph.role.replace("_", " "),
                io=_io_block(graph.inputs, graph.outputs),
                warmup=_warmup_block(graph, profiles[graph.role]),
                profiles=f" profile: [ {numbers} ]" if numbers else "",
            )
    return outputs


def _write(
    options: CsmExportOptions, build_engine: EngineBuilder | None, shapes: dict[str, Any]
) -> list[Path]:
    """Write every model of the checkpoint; fill ``shapes`` (recorded in the manifest)."""
    progress(f"{options.name}: loading {options.checkpoint} with transformers")
    model, tokenizer, dtype = _load(options)
    config = model.config
    name, root = options.name, options.out
    outputs: list[Path] = []
    if build_engine is not None:
        outputs += _write_engines(model, dtype, options, build_engine)
    else:
        for graph in _graphs(model):
            directory = root / f"{name}_{graph.role}"
            progress(f"{name}: exporting {graph.role} to ONNX")
            outputs += _export_graph(graph, dtype, directory)
            outputs += write_model(
                TEMPLATE / "network",
                directory,
                options.target,
                model_name=directory.name,
                role=graph.role.replace("_", " "),
                io=_io_block(graph.inputs, graph.outputs),
                warmup=_warmup_block(graph),
            )
            if options.target == "cpu":
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
