"""Adding methods to an earlier evaluation of the same questions.

A result can be extended by a later run on the same samples and settings (``kvpacket eval ... --append``,
or ``python -m kvpacket_rag.evaluation.merge BASE EXTRA`` for two finished runs), for instance ``kv_packet`` once its adapter is trained, without rerunning the recompute baselines. Every
run answers with ``full_recompute`` too; greedy decoding makes its answers reproducible, and the merge
refuses runs whose reference answers differ, so fidelity and KL stay comparable. Timings are only
compared within a session: each method's ``ttft_vs_full`` is relative to the full recompute measured in
its own session, on the same clock.
"""

from __future__ import annotations

from .harness import REFERENCE

SAME_SETTINGS = ("dataset", "split", "seed", "n", "max_new_tokens", "quantization", "order")
SETTING_DEFAULTS = {"quantization": "none", "order": "dataset"}
"""What results written before a setting existed ran with."""


def session_of(result: dict) -> dict:
    """What one run contributed: its machine facts (command, date, threads), adapter, wall time and methods."""
    return {"machine": result["machine"], "adapter": result["adapter"], "wall_s": result["wall_s"],
            "methods": list(result["methods"])}


def sessions(result: dict) -> list[dict]:
    """The sessions a result was made in (one for a plain run)."""
    return result.get("sessions") or [session_of(result)]


def check_settings(base: dict, settings: dict) -> None:
    """Raise ValueError unless ``settings`` (a result or a dict of `SAME_SETTINGS`) match ``base``'s."""
    for key in SAME_SETTINGS:
        here, there = settings.get(key, SETTING_DEFAULTS.get(key)), base.get(key, SETTING_DEFAULTS.get(key))
        if here != there:
            raise ValueError(f"cannot append: {key} is {here!r} here but {there!r} in the existing result; rerun "
                             "with the same --dataset/--split/--seed/--n/--max-new-tokens/--quantization/--order or "
                             "write a new file")


def merge_results(base: dict, extra: dict) -> dict:
    """``base`` with the methods of ``extra`` (a later run on the same questions) added or replaced.

    The reference of ``base`` is kept. Each method summary gets ``session``, an index into the merged
    ``sessions`` list, which keeps only the sessions some method comes from (a run whose methods were all
    replaced drops out); the top-level ``adapter`` is the one ``kv_packet`` was measured with.

    Raises:
        ValueError: different settings, model or questions, or reference answers that differ.
    """
    check_settings(base, extra)
    if base["model"]["fingerprint"] != extra["model"]["fingerprint"]:
        raise ValueError("cannot append: the existing result was made with another model")
    _check_reference(base["methods"][REFERENCE]["records"], extra["methods"][REFERENCE]["records"])
    merged_sessions = [dict(s) for s in sessions(base)] + [session_of(extra)]
    index = len(merged_sessions) - 1
    methods = {name: {"session": 0, **summary} for name, summary in base["methods"].items()}
    for name, summary in extra["methods"].items():
        if name != REFERENCE:
            methods[name] = {**summary, "session": index}
    methods = {name: methods[name] for name in sorted(methods, key=_rank)}
    merged_sessions, methods = _drop_unused_sessions(merged_sessions, methods)
    adapter_session = merged_sessions[methods["kv_packet"]["session"]] if "kv_packet" in methods else merged_sessions[-1]
    return {**base, "methods": methods, "sessions": merged_sessions, "adapter": adapter_session["adapter"],
            "wall_s": base["wall_s"] + extra["wall_s"],
            "process_peak_rss_mb": max(base["process_peak_rss_mb"], extra["process_peak_rss_mb"])}


def _drop_unused_sessions(all_sessions: list[dict], methods: dict) -> tuple[list[dict], dict]:
    """Keep the sessions some method still comes from (a replaced method's session goes), re-indexed."""
    used = sorted({summary["session"] for summary in methods.values()})
    new_index = {old: new for new, old in enumerate(used)}
    return ([all_sessions[i] for i in used],
            {name: {**summary, "session": new_index[summary["session"]]} for name, summary in methods.items()})


def _rank(name: str) -> tuple:
    """Display order: the reference, the packet methods, then each sweep by its setting, then the rest."""
    fixed = [REFERENCE, "no_recompute", "closed_book", "kv_packet", "kv_packet_first_exact"]
    if name in fixed:
        return (fixed.index(name), 0.0, name)
    family, _, arg = name.partition(":")
    try:
        value = float(arg)
    except ValueError:
        value = 0.0
    return (len(fixed) + (0 if family == "cacheblend" else 1 if family == "epic" else 2), value, name)


def _check_reference(old: list[dict], new: list[dict]) -> None:
    if [r["id"] for r in old] != [r["id"] for r in new]:
        raise ValueError("cannot append: the runs answered different questions")
    for a, b in zip(old, new):
        same = (a["prediction_sha"] == b["prediction_sha"]) if "prediction_sha" in a and "prediction_sha" in b \
            else a["generated_tokens"] == b["generated_tokens"] and a["f1"] == b["f1"]
        if not same:
            raise ValueError(f"cannot append: the {REFERENCE} answer to {a['id']} differs between the runs "
                             "(another machine, dtype or library version?); rerun every method in one run")


def main(argv: list[str] | None = None) -> int:
    """``python -m kvpacket_rag.evaluation.merge BASE EXTRA [--out PATH] [--plot]``: merge two result files."""
    import argparse
    import json
    from pathlib import Path

    from .run import write_result

    parser = argparse.ArgumentParser(prog="python -m kvpacket_rag.evaluation.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="result JSON to extend")
    parser.add_argument("extra", help="result JSON of a later run on the same questions")
    parser.add_argument("--out", default=None, help="where to write the merged result (default: BASE)")
    parser.add_argument("--plot", action="store_true", help="also write PNGs next to the output")
    args = parser.parse_args(argv)
    merged = merge_results(json.loads(Path(args.base).read_text()), json.loads(Path(args.extra).read_text()))
    for path in write_result(merged, args.out or args.base, args.plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
