"""``nulls generate``: sample text from a checkpoint in a deployment mode, streamed to the terminal."""
from __future__ import annotations

import argparse
import sys

from ..routing.build import CheckpointSources

TITLE_PREFIX = "title:"


def _say(line: str) -> None:
    print(f"generate: {line}", file=sys.stderr, flush=True)


def refuse_if_off(sources: CheckpointSources, source: int, title: str) -> None:
    """A forgotten or suppressed source cannot be routed to: its sinks are off (or zero)."""
    state = sources.state
    if source in set(state.disabled_sources):
        why = "was forgotten by `nulls unlearn` (erased: its sink rows are zero and disabled)"
    elif source in set(state.suppressed_sources):
        why = "is suppressed (`nulls unlearn --suppress`: its sinks are disabled)"
    else:
        return
    raise ValueError(f"source {source} ({title!r}) {why} in {sources.checkpoint}; route to a surviving source, "
                     "omit --source to route the prompt to its nearest surviving source, or use --mode backbone")


def resolve_source(sources: CheckpointSources, spec: str) -> tuple[int, str]:
    """``spec`` as (source index, title): an integer is an index, anything else a manifest title
    (``title:1984`` for a title made of digits). Refuses unknown, ambiguous and switched-off sources."""
    from data_prep.manifest import Manifest

    manifest = Manifest(sources.prep_dir)
    text = spec.strip()
    if text.isdigit():
        source = int(text)
        if source >= len(manifest):
            raise ValueError(f"--source {source}: out of range, {manifest.path} has {len(manifest)} sources")
    else:
        title = text.removeprefix(TITLE_PREFIX)
        hits = manifest.lookup_title(title)
        if not hits:
            raise ValueError(f"--source {spec!r}: no source has this title in {manifest.path}")
        if len(hits) > 1:
            raise ValueError(f"--source {spec!r}: {len(hits)} sources share this title in {manifest.path} "
                             f"(indices {hits[:10]}); pass one index")
        source = hits[0]
    title = manifest.row(source, ["title"])["title"] or ""
    refuse_if_off(sources, source, title)
    return source, title


def route_prompt(sources: CheckpointSources, prompt: str, manifest: str | None) -> tuple[int, str]:
    """The nearest surviving source of ``prompt`` by the checkpoint's routing index (built now if missing)."""
    from data_prep.manifest import Manifest

    from ..routing.build import build_index
    from ..routing.source_index import RoutingIndexMissing, SourceIndex, build_command

    hint = build_command(sources.checkpoint, manifest=manifest)
    try:
        index = SourceIndex.open(sources.checkpoint, sources.manifest_sha256, hint)
    except RoutingIndexMissing:
        _say(f"no routing index in {sources.checkpoint / 'routing'}; building it from the titles now "
             f"(once per checkpoint; `{hint}` builds it ahead of time)")
        build_index(sources.checkpoint, "title", manifest, log=_say)
        index = SourceIndex.open(sources.checkpoint, sources.manifest_sha256, hint)
    off = sources.state.off_sources()
    chosen, score = index.route_texts([prompt], exclude=off)
    source = int(chosen[0])
    title = Manifest(sources.prep_dir).row(source, ["title"])["title"] or ""
    _say(f"routed the prompt to source {source} {title!r} (cosine {float(score[0]):.3f} by {index.kind}, "
         f"nearest of {len(index) - len(off)} surviving sources)")
    return source, title


def cmd_generate(args: argparse.Namespace) -> int:
    from ..routing.build import checkpoint_sources
    from .generate import Routing, SamplingOptions, TextStream, generate
    from .load import load_for_inference

    options = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    if args.source is not None and args.mode != "route":
        raise ValueError(f"--source applies to --mode route only (got --mode {args.mode})")
    sources = checkpoint_sources(args.checkpoint, args.manifest)
    if args.mode == "route":
        if args.source is not None:
            source, title = resolve_source(sources, args.source)
            _say(f"routing to source {source} {title!r}")
        else:
            source, title = route_prompt(sources, args.prompt, args.manifest)
        routing = Routing("route", source)
    else:
        routing = Routing(args.mode)
    loaded = load_for_inference(args.checkpoint, args.manifest, sources=sources)
    sp = loaded.tokenizer
    prompt = sp.encode(args.prompt)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write(args.prompt)
    stream = TextStream(sp, prompt, write)
    eos = sp.eos_id()
    result = generate(loaded.model, prompt, routing, options, context=loaded.cfg.model.seq_length,
                      vocab_size=loaded.vocab_size, eos_id=eos if eos >= 0 else None, on_token=stream.push)
    stream.finish()
    write("\n")
    end = "end of sequence" if result.stopped_at_eos else f"{options.max_new_tokens} tokens"
    rate = len(result.tokens) / result.seconds if result.seconds > 0 else 0.0
    _say(f"{len(result.tokens)} tokens in {result.seconds:.2f}s ({rate:.1f} tok/s), mode {routing.mode}, "
         f"stopped at {end}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``nulls generate`` to the ``nulls`` command line."""
    p = subparsers.add_parser(
        "generate", help="sample text from a checkpoint (route / expected / backbone mode)",
        description="Load a checkpoint (any TP/PP layout) in this process and continue PROMPT, streaming the "
                    "text as it is produced. Modes: route (backbone + one source's sinks: --source, or the "
                    "prompt's nearest surviving source by MiniLM title similarity), expected (every sink "
                    "scaled by its expected mask) and backbone (no sinks). Forgotten sources are off in every "
                    "mode and cannot be routed to.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (or a checkpoints root / run dir with `latest`)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--mode", choices=("route", "expected", "backbone"), default="route",
                   help="which sinks to use (default: %(default)s)")
    p.add_argument("--source", metavar="TITLE_OR_INDEX", default=None,
                   help="with --mode route: the source whose sinks to use, by manifest title or index "
                        "(`title:1984` for a numeric title); default: the prompt's nearest surviving source")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--manifest", metavar="PREP_DIR", default=None,
                   help="prep folder holding the sources manifest and tokenizer, when it moved since training")
    p.set_defaults(func=cmd_generate)
