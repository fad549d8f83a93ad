"""`modalkv` command line: thin commands over the library; rich output lives only here."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Annotated

import torch
import typer
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from modalkv.api import check_prompt_length
from modalkv.bench_cli import bench_command
from modalkv.cache import CompressedCache
from modalkv.cli_common import console, fail, parse_budget, parse_params
from modalkv.compat import CACHE_KWARG
from modalkv.eval.cli import eval_command, report_command
from modalkv.generation import encode_prompt, generate_timed
from modalkv.modality import modality_from_input_ids
from modalkv.models import DEFAULT_MODEL, MINI_VLM, load_model, parse_dtype
from modalkv.multimodal import encode_multimodal, is_processor
from modalkv.presses import PRESSES, WRAPPERS, Press, get_press

app = typer.Typer(help="KV-cache compression for multimodal and text LLMs.", no_args_is_help=True)

ModelOption = Annotated[str, typer.Option(help="embedded model name, local folder or hub id")]
WRAPPED = ", ".join(f"{name}:<method>" for name in WRAPPERS)
MethodOption = Annotated[str, typer.Option(help=f"one of: {', '.join(PRESSES)}, {WRAPPED} (see `methods`)")]
BudgetOption = Annotated[str, typer.Option(help="kept fraction in (0, 1] or kept tokens (integer > 1)")]
# What the demo contrasts: methods that keep a passkey at low budgets on SmolLM2 (tova, keydiff) and ones that lose it
# (streaming_llm, snapkv), beside the two this project implements (docs/results-smollm2*.md).
DEMO_METHODS = "streaming_llm,snapkv,tova,keydiff,madakv,retentivekv"
PromptOption = Annotated[str | None, typer.Option(help="prompt text")]
PromptFileOption = Annotated[Path | None, typer.Option(help="plain-text prompt file")]
RawOption = Annotated[bool, typer.Option(help="tokenise the prompt as is: no chat template, no special tokens")]
DtypeOption = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
ModalityOption = Annotated[
    Path | None,
    typer.Option(
        help="JSON list of modality codes per prompt token (0 text, 1 image, 2 video); default: from the model"
    ),
]
ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="method parameter KEY=VALUE (repeatable), e.g. pooling=max"),
]
ImageOption = Annotated[
    list[Path] | None, typer.Option(help="image file for a vision-language model (repeatable, in prompt order)")
]


def make_press(method: str, budget: str, params: list[str] | None):
    try:
        return get_press(method, budget=parse_budget(budget), **parse_params(params))
    except TypeError as error:  # an unknown keyword for this press's dataclass
        raise ValueError(f"{method} does not take that parameter: {error}") from None


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise typer.BadParameter("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise typer.BadParameter(f"prompt file not found (or not a file): {prompt_file}")
        try:
            return prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise typer.BadParameter(f"prompt file {prompt_file} is not UTF-8 text ({error.reason})") from None
    return prompt


def read_modality(path: Path | None) -> torch.Tensor | None:
    """[1, S] modality map from a JSON list of codes, or None."""
    if path is None:
        return None
    try:
        codes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise typer.BadParameter(f"cannot read the modality file {path}: {error}") from None
    if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise typer.BadParameter(f"the modality file {path} must hold a JSON list of integers")
    return torch.tensor([codes], dtype=torch.long)


def read_images(paths: list[Path] | None) -> list[Image.Image]:
    """Opens each --image file as RGB; a missing or unreadable file is a usage error naming it."""
    images = []
    for path in paths or []:
        if not path.is_file():
            raise typer.BadParameter(f"image file not found (or not a file): {path}")
        try:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as error:
            raise typer.BadParameter(f"cannot read the image {path}: {error}") from None
    return images


def load_and_encode(
    model: str, dtype: str, text: str, images: list[Image.Image], raw: bool, modality: torch.Tensor | None
):
    """Loads `model` and encodes the prompt: the one path of `generate`, `inspect` and `heads`. A vision-language
    model's processor takes the text and images (and gives the modality and patch maps), a tokenizer the text alone.
    `modality` (the user's map) replaces the derived one; the patch grid is then inferred from it.

    Returns:
        (model, tokenizer for decoding, inputs, modality map or None): `inputs` holds `patches` when the processor
        gave them, and never `modality`.

    Raises:
        ValueError: images given to a text-only model (and the processor's own errors).
    """
    with console.status(f"loading {model}"):
        lm, tokenizer = load_model(model, dtype=parse_dtype(dtype))
    if is_processor(tokenizer):  # a vision-language model: its processor also gives the maps
        inputs = encode_multimodal(lm, tokenizer, text, images, raw=raw)
        derived, tokenizer = inputs.pop("modality", None), tokenizer.tokenizer
        if modality is None:
            modality = derived
        else:
            inputs.pop("patches", None)
    elif images:
        raise ValueError(
            f"{model} is a text-only model (it has no image processor); --image needs a vision-language model"
        )
    else:
        inputs = encode_prompt(tokenizer, text, raw=raw)
        if modality is None:
            modality = modality_from_input_ids(lm.config, inputs["input_ids"])
    return lm, tokenizer, inputs, modality


def prefill(
    model: str,
    dtype: str,
    press,
    text: str,
    raw: bool,
    modality: torch.Tensor | None,
    images: list[Image.Image] | None = None,
):
    """Loads `model`, runs the prompt's prefill (with its images) through `press`; returns (compressed cache, prompt
    tokens, modality map or None)."""
    lm, _, inputs, modality = load_and_encode(model, dtype, text, images or [], raw, modality)
    check_prompt_length(lm, inputs["input_ids"].shape[1])
    cache = CompressedCache(press, modality=modality, patches=inputs.pop("patches", None))
    with console.status(f"prefill of {inputs['input_ids'].shape[1]} tokens"), press.attach(lm), torch.no_grad():
        lm(**inputs, **{CACHE_KWARG: cache}, use_cache=True)
    return cache, inputs["input_ids"].shape[1], modality


def modality_codes(modality: torch.Tensor | None, prompt_tokens: int) -> list[int]:
    """The prompt's modality code per token (0 text, 1 image, 2 video), all text without a map."""
    return modality[0].tolist() if modality is not None else [0] * prompt_tokens


@app.command()
def generate(
    model: ModelOption = DEFAULT_MODEL,
    method: MethodOption = "full",
    budget: BudgetOption = "1.0",
    prompt: PromptOption = None,
    prompt_file: PromptFileOption = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    min_new_tokens: Annotated[int, typer.Option(min=0)] = 0,
    raw: RawOption = False,
    dtype: DtypeOption = "float32",
    modality_file: ModalityOption = None,
    param: ParamOption = None,
    image: ImageOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    compile: Annotated[
        bool, typer.Option("--compile", help="decode with a torch.compile'd forward (CUDA graphs on a GPU)")
    ] = False,
) -> None:
    """Generate an answer with a compressed KV cache (from a text prompt, or images and a prompt)."""
    text = read_prompt(prompt, prompt_file)
    modality = read_modality(modality_file)
    images = read_images(image)
    try:
        press = make_press(method, budget, param)
        lm, tokenizer, inputs, modality = load_and_encode(model, dtype, text, images, raw, modality)
        with console.status(f"prefill of {inputs['input_ids'].shape[1]} tokens and decoding with {method}"):
            result = generate_timed(lm, tokenizer, press, inputs, max_new_tokens, min_new_tokens, modality, compile)
    except ValueError as error:
        raise fail(error) from error
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(result.text)


@app.command()
def inspect(
    dump_kept: Annotated[Path, typer.Option(help="where to write the kept positions (JSON)")],
    model: ModelOption = DEFAULT_MODEL,
    method: MethodOption = "full",
    budget: BudgetOption = "1.0",
    prompt: PromptOption = None,
    prompt_file: PromptFileOption = None,
    raw: RawOption = False,
    dtype: DtypeOption = "float32",
    modality_file: ModalityOption = None,
    param: ParamOption = None,
    image: ImageOption = None,
) -> None:
    """Run the prefill with a method and write the kept token positions of every layer and KV head, with the
    prompt's modality map (0 text, 1 image, 2 video per token)."""
    text = read_prompt(prompt, prompt_file)
    modality = read_modality(modality_file)
    images = read_images(image)
    try:
        press = make_press(method, budget, param)
        cache, prompt_tokens, modality = prefill(model, dtype, press, text, raw, modality, images)
    except ValueError as error:
        raise fail(error) from error
    record = {
        "method": method,
        "budget": press.budget,
        "prompt_tokens": prompt_tokens,
        "layers": [layer[0] for layer in cache.kept_positions()],
        "modality": modality_codes(modality, prompt_tokens),
    }
    dump_kept.parent.mkdir(parents=True, exist_ok=True)
    dump_kept.write_text(json.dumps(record))
    kept = sum(len(head) for layer in record["layers"] for head in layer)
    console.print(f"wrote {dump_kept}: {kept} kept (layer, head, token) entries, {len(record['layers'])} layers")


@app.command()
def heads(
    out: Annotated[Path, typer.Option(help="figure to write (PNG); the numbers go to the same name with .json")],
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="madakv (the method whose head preferences are drawn)")] = "madakv",
    budget: BudgetOption = "0.2",
    prompt: PromptOption = None,
    prompt_file: PromptFileOption = None,
    raw: RawOption = False,
    modality_file: ModalityOption = None,
    param: ParamOption = None,
    image: ImageOption = None,
) -> None:
    """MadaKV's head preferences: visual share of each KV head's attention per layer, and per-layer budgets."""
    from modalkv.plots import head_preference_figure

    text = read_prompt(prompt, prompt_file)
    modality = read_modality(modality_file)
    images = read_images(image)
    try:
        if method != "madakv":
            raise ValueError(f"heads draws MadaKV's modality preferences; got method {method!r}")
        press = make_press(method, budget, param)
        cache, prompt_tokens, modality = prefill(model, "float32", press, text, raw, modality, images)
        stats = cache.press_state.get("heads")
        if not stats:
            raise ValueError("nothing was compressed (the budget keeps the whole prompt): no preferences to draw")
        layers = sorted(stats)
        record = {
            "method": press.label(),
            "budget": press.budget,
            "prompt_tokens": prompt_tokens,
            "visual_preference": [stats[i][0][0].tolist() for i in layers],
            "kept_per_head": [stats[i][1][0].tolist() for i in layers],
            "modality": modality_codes(modality, prompt_tokens),
        }
        visual = sum(code != 0 for code in record["modality"])
        title = f"{press.label()}, budget {press.budget}, {model}: {prompt_tokens} tokens, {visual} visual"
        if images:
            title += f" ({len(images)} image{'s' if len(images) > 1 else ''})"
        figure = head_preference_figure(record["visual_preference"], record["kept_per_head"], title)
    except ValueError as error:
        raise fail(error) from error
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(record))
    console.print(f"wrote {out} and {out.with_suffix('.json')}")


@app.command()
def methods() -> None:
    """List the methods, one line each, with their parameters and defaults."""
    table = Table(title="methods (--method NAME, parameters with -p KEY=VALUE)")
    for column in ("method", "what it keeps", "parameters (defaults)"):
        table.add_column(column)
    for name, press in PRESSES.items():
        evicts_while_decoding = press.decode_scores is not Press.decode_scores
        params = [
            f"{f.name}={f.default}"
            for f in dataclasses.fields(press)
            if f.init and f.name != "budget" and (f.name != "evict_every" or evicts_while_decoding)
        ]
        summary = (press.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, summary, ", ".join(params))
    for name, press in WRAPPERS.items():
        own = [f for f in dataclasses.fields(press) if f.init and f.name not in ("budget", "evict_every", "press")]
        summary = (press.__doc__ or "").strip().splitlines()[0]
        table.add_row(f"{name}:<method>", summary, ", ".join(f"{f.name}={f.default}" for f in own))
    Console(width=160).print(table)


@app.command()
def demo(
    model: ModelOption = DEFAULT_MODEL,
    tokens: Annotated[int, typer.Option(help="prompt length in tokens")] = 3000,
    budgets: Annotated[str, typer.Option(help="comma-separated budgets")] = "0.1,0.2,0.5",
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = DEMO_METHODS,
) -> None:
    """Passkey retrieval at three depths of a long prompt: where each method keeps the key and where it loses it, with
    the memory it holds and its decoding speed, against the full cache. Each prompt is prefilled once and replayed
    for every (method, budget)."""
    from modalkv.eval.passkey import passkey_example
    from modalkv.generation import share_prefill

    try:
        ratios = [parse_budget(b) for b in budgets.split(",") if b]
        presses = [get_press("full")] + [get_press(m, budget=r) for m in methods.split(",") if m for r in ratios]
        with console.status(f"loading {model}"):
            lm, tokenizer = load_model(model)
    except ValueError as error:
        raise fail(error) from error
    examples = [passkey_example(tokenizer, tokens, depth=d, seed=tokens + i) for i, d in enumerate((0.1, 0.5, 0.9))]
    results: dict[int, list] = {id(press): [] for press in presses}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=len(presses) * len(examples))
        for example in examples:
            progress.update(task, description=f"prefilling the prompt with the key at depth {example.depth}")
            inputs = encode_prompt(tokenizer, example.text, raw=True)
            shared = share_prefill(lm, inputs)
            for press in presses:
                progress.update(task, description=f"{press.label()}@{press.budget:g}, key at depth {example.depth}")
                result = generate_timed(lm, tokenizer, press, inputs, max_new_tokens=8, shared=shared)
                results[id(press)].append((result, example.answer in result.text))
                progress.advance(task)
    full_ms = statistics.median(r.decode_ms_per_token for r, _ in results[id(presses[0])])
    table = Table(title=f"passkey retrieval in {tokens}-token prompts, key at depths 0.1 / 0.5 / 0.9 ({model})")
    for column in ("method", "budget", "answers", "correct", "KV MiB", "of full", "decode ms/token", "vs full"):
        table.add_column(column, justify="left" if column in ("method", "answers") else "right")
    for press in presses:
        rows = results[id(press)]
        correct = sum(ok for _, ok in rows)
        ms = statistics.median(r.decode_ms_per_token for r, _ in rows)
        table.add_row(
            press.label(),
            f"{press.budget:g}",
            " / ".join(r.text.strip().split()[0] if r.text.strip() else "-" for r, _ in rows),
            f"[{'green' if correct == len(rows) else 'red'}]{correct}/{len(rows)}[/]",
            f"{statistics.mean(r.cache_bytes for r, _ in rows) / 2**20:.1f}",
            f"{sum(r.cache_bytes for r, _ in rows) / sum(r.full_cache_bytes for r, _ in rows):.2f}",
            f"{ms:.1f}",
            f"{full_ms / ms:.2f}x",
        )
        if (press is presses[0] or press.budget == ratios[-1]) and press is not presses[-1]:
            table.add_section()
    Console(width=140).print(table)
    console.print(
        "Three prompts per row: a hint, not a measurement (modalkv eval gives intervals). Decoding speed-ups grow with "
        "the context and the batch (docs/benchmark.md); at a few thousand tokens on a CPU the weights dominate."
    )


@app.command()
def calibrate(
    model: ModelOption = MINI_VLM,
    examples: Annotated[int, typer.Option(help="prompts to average over")] = 64,
    pictures: Annotated[int, typer.Option(help="pictures per prompt (vision-language models)")] = 8,
    tokens: Annotated[int, typer.Option(help="tokens per prompt (text-only models)")] = 1024,
    seed: Annotated[int, typer.Option(help="seed of the calibration prompts")] = 0,
    out: Annotated[Path | None, typer.Option(help="JSON file to write (default: where the methods look)")] = None,
) -> None:
    """Measure a model's head statistics once (visual heads for SparseMM, key redundancy for MixKV)."""
    from modalkv.calibrate import calibrate as measure
    from modalkv.head_statistics import statistics_path

    if examples < 1 or pictures < 1 or tokens < 16:
        raise fail(ValueError("examples and pictures must be >= 1 and tokens >= 16"))
    try:
        with console.status(f"loading {model}"):
            lm, processor = load_model(model)
    except ValueError as error:
        raise fail(error) from error
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"calibrating {model}", total=examples)
        statistics = measure(lm, processor, examples, pictures, tokens, seed, lambda _: progress.advance(task))
    path = statistics.save(out or statistics_path(lm.config))
    table = Table(title=f"head statistics of {statistics.model}: {statistics.source}")
    for column in ("layer", "key redundancy per KV head", "visual score: top query heads"):
        table.add_column(column)
    for layer, redundancy in enumerate(statistics.redundancy):
        visual = statistics.visual[layer] if statistics.visual is not None else []
        top = sorted(range(len(visual)), key=visual.__getitem__, reverse=True)[:3]
        table.add_row(
            str(layer),
            " ".join(f"{r:.2f}" for r in redundancy),
            " ".join(f"h{h}={visual[h]:.3f}" for h in top if visual[h] > 0) or "-",
        )
    Console(width=140).print(table)
    console.print(f"wrote {path}")
    if warning := statistics.no_visual_head_warning():
        console.print(f"[yellow]warning:[/] {warning}")


app.command("bench")(bench_command)
app.command("eval")(eval_command)
app.command("report")(report_command)
