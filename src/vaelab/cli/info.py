"""``vaelab info RUN``: a run's config, summary and model summary table."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a run's config, summary and model")
    p.add_argument("run", metavar="RUN", help="a run folder, or NAME under ./runs")
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vaelab.config import dumps
    from vaelab.model import model_summary
    from vaelab.runs import load_run

    r = load_run(args.run)
    if args.json:
        print(json.dumps(r.summary, indent=2))
        return 0
    print(f"# run {r.path}\n\n## config\n{dumps(r.config)}")
    print("## summary")
    print(describe_summary(r.summary) if r.summary else "(no summary.json: unfinished run)")
    print("\n## model")
    print(model_summary(r.model))
    return 0


def describe_summary(s: dict) -> str:
    """A few readable lines of a run's ``summary.json``."""
    d = s["dataset"]
    lines = [
        f"dataset: {d['name']} {'x'.join(map(str, d['shape']))} {d['value_kind']} "
        f"(train {d['train']} / valid {d['valid']} / test {d['test']})",
        f"trained: {s['epochs']} epochs, {s['steps']} steps, {s['wall_time_s']:.1f} s wall, "
        f"{s['images_per_s']:.0f} images/s on {s['hardware']['device']} "
        f"({s['hardware']['device_name']})",
        f"parameters: {s['parameters']:,}",
    ]
    for split in ("train", "valid"):
        rec = s.get(split)
        if rec:
            line = (
                f"final {split}: ELBO {rec['elbo']:.4f}, rec {rec['rec']:.4f}, KL {rec['kl']:.4f}"
            )
            if "bits_per_dim" in rec:
                line += f", {rec['bits_per_dim']:.4f} bits/dim"
            lines.append(line)
    if s.get("best_valid_elbo") is not None:
        lines.append(f"best valid ELBO: {s['best_valid_elbo']:.4f} (epoch {s['best_epoch']})")
    if not s.get("likelihood_proper", True):
        lines.append(f"note: {s.get('likelihood_note', 'likelihood not proper for this data')}")
    v = s["versions"]
    lines.append(f"versions: python {v['python']}, torch {v['torch']}, vaelab {v['vaelab']}")
    return "\n".join(lines)
