"""Evaluation harness: methods side by side on real data (quality, fidelity, KL, TTFT, FLOPs).

- `evaluate` runs methods over samples through `PacketEngine.answer` and scores them;
- `run_evaluation` adds the facts of the run (model, adapter, machine, command) and `write_result`
  writes JSON, a markdown table and plots;
- ``python -m kvpacket_rag.evaluation.report FILES`` builds ``benchmarks/RESULTS.md``.

The CLI is ``kvpacket eval`` (`kvpacket_rag.cli.eval`).
"""

from .harness import REFERENCE, EvalConfig, evaluate, summarize
from .run import run_evaluation, write_result
from .teacher import continuation_logprobs, kl_per_token

__all__ = ["REFERENCE", "EvalConfig", "continuation_logprobs", "evaluate", "kl_per_token", "run_evaluation",
           "summarize", "write_result"]
