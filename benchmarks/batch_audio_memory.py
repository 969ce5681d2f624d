"""Peak memory of one worker batch of worst-case songs, with and without the batch's audio cap.

Each run is a fresh process that builds the real scoring pipeline (logmel encoder, no Kafka
or Redis needed: ``ScoringPipeline.process`` parses, fetches, decodes and encodes without
writing) and hands it one batch of ``--songs`` identical 600 s, 48 kHz stereo FLAC files, the
worst case under the default ``audio.max_duration_s`` and ``audio.max_sample_rate``. It
prints the peak RSS over the RSS just before the batch, the decode waves the cap made and
the most decoded audio the batch held at once, per ``worker.max_batch_audio_bytes``.

    python benchmarks/batch_audio_memory.py --songs 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from _common import machine_info, print_figures, table

_CHILD = r"""
import json, resource, sys
from pathlib import Path
from consumers.loop import Message
from consumers.pipeline import ScoringPipeline
from ranker import stores
from ranker.encoders import build_encoder
from ranker.events import SongGenerated
from ranker.scoring import load_current_model
from ranker.settings import Settings

args = json.loads(sys.argv[1])
root = Path(args["root"])
settings = Settings(
    state_dir=root / "state", dev_mode=True, encoder="logmel",
    index={"path": str(root / "index")},
    worker={"max_batch_audio_bytes": args["cap"]},
)
encoder = build_encoder(settings)
pipeline = ScoringPipeline(settings, encoder, load_current_model(settings, encoder.spec),
                           stores.embedding_index(settings, encoder.vector_dim), stores.score_store(settings))
events = [SongGenerated(song_id=f"w{i}", audio_uri=Path(args["song"]).as_uri(), generator="bench",
                        created_at="2026-12-01T00:00:00Z") for i in range(args["songs"])]
messages = [Message("b", 0, i, e.song_id.encode(), e.to_bytes()) for i, e in enumerate(events)]
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * resource.getpagesize()
result, _ = pipeline.process(messages)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"scored": len(result.scored), "waves": result.audio_waves,
                  "held_mb": result.peak_audio_bytes / 1e6, "delta_mb": (peak - before) / 1e6}))
"""


def write_song(path: Path, sr: int = 48_000, channels: int = 2, seconds: float = 600.0) -> None:
    with sf.SoundFile(str(path), "w", sr, channels, format="FLAC", subtype="PCM_16") as f:
        block = sr * 10
        for i in range(round(seconds * sr) // block):
            t = (np.arange(block) + i * block) / sr
            y = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234.5 * t)
            f.write(np.stack([y] * channels, axis=1).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=8)
    ap.add_argument("--caps-mib", default="1024,256", help="max_batch_audio_bytes values to try, in MiB")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        song = Path(tmp) / "worst.flac"
        write_song(song)
        for cap_mib in [int(c) for c in args.caps_mib.split(",")]:
            root = Path(tmp) / f"cap{cap_mib}"
            child = {"root": str(root), "song": str(song), "songs": args.songs, "cap": cap_mib * 2**20}
            run = subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(child)], capture_output=True, text=True, check=False
            )
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            out = json.loads(run.stdout.strip().splitlines()[-1])
            held, delta = round(out["held_mb"], 1), round(out["delta_mb"])
            rows.append([cap_mib, args.songs, out["scored"], out["waves"], held, delta])
    print_figures(machine_info())
    print(
        table(
            f"one batch of {args.songs} songs of 600 s, 48 kHz stereo FLAC (about 12 MB each)",
            ["cap MiB", "songs", "scored", "waves", "most held MB", "peak RSS delta MB"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
