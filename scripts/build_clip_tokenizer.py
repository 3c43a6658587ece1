"""Convert OpenAI's CLIP BPE file into the files transformers' CLIPTokenizer reads.

The project ships the result in ``pytest_unlearnatk/assets/clip_tokenizer/`` so that tests and the
tiny pipeline get the real 49408-token CLIP vocabulary without any download. To rebuild it:

    pip download --no-deps clip-anytorch        # a wheel; do not install it (needs torchvision)
    unzip -o clip_anytorch-*.whl clip/bpe_simple_vocab_16e6.txt.gz
    python scripts/build_clip_tokenizer.py clip/bpe_simple_vocab_16e6.txt.gz

The vocabulary layout follows CLIP's own tokenizer: 256 byte symbols, the same with the
end-of-word marker ``</w>``, one entry per merge rule (the first 48894 rules of the file), then
``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pytest_unlearnatk" / "assets" / "clip_tokenizer"


def byte_symbols() -> list[str]:
    """The printable stand-in character for each of the 256 byte values, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codepoints = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


def build(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise SystemExit(f"{bpe_gz}: expected {VOCAB_SIZE} tokens, built {len(tokens)}; is this CLIP's BPE file?")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    print(f"wrote {out_dir}/vocab.json and merges.txt ({len(tokens)} tokens, {len(merges)} merges)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="bpe_simple_vocab_16e6.txt.gz from the clip-anytorch wheel")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    build(args.bpe_gz, args.out)


if __name__ == "__main__":
    main()
