"""`kvpacket eval` results on the same questions of one set, as one frontier run file for `gather.py`.

    python benchmarks/quality/eval_to_frontier.py --out benchmarks/quality/frontier_X.json \\
        DESIGN=RESULT.json:METHOD [DESIGN=RESULT.json:METHOD ...]

Each result must hold the same questions with the same full-recompute answers (the reference); its
``full_recompute`` row comes from the first. TTFT ratios are each run's own (same machine, one run after another).
"""

from __future__ import annotations

import argparse
import json

FIELDS = ("fidelity", "kl", "recall", "f1", "ttft_vs_full", "ttft_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="DESIGN=RESULT.json:METHOD")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    methods, commands, reference, dataset, n = {}, [], None, None, None
    for spec in args.runs:
        name, rest = spec.split("=", 1)
        path, method = rest.split(".json:", 1)
        result = json.load(open(path + ".json"))
        answers = [(r["id"], r.get("prediction_sha", r.get("prediction")))
                   for r in result["methods"]["full_recompute"]["records"]]
        if reference is None:
            reference, dataset, n = answers, result["dataset"], result["n"]
            methods["full_recompute"] = {k: result["methods"]["full_recompute"][k] for k in FIELDS}
        elif answers != reference or result["dataset"] != dataset:
            raise SystemExit(f"{path}.json answers other questions (or differently) than the first result")
        methods[name] = {k: result["methods"][method][k] for k in FIELDS}
        commands.append(result["machine"]["command"])
    out = {"results": {dataset: {**methods, "_n": n}}, "command": " ; ".join(commands), "seed": None,
           "variants": {spec.split("=", 1)[0]: spec.split("=", 1)[1] for spec in args.runs}}
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
