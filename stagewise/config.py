"""Generated-length policies.

With real weights a sample ends at EOS or ``max_new_tokens``. With random weights EOS is
meaningless, so the number of tokens to generate comes from a policy:

- ``fixed:N``    every sample generates N tokens (default ``fixed:46``, the seeds' mean 45.5
                 rounded);
- ``mean:X``     lengths ``round((i+1) X) - round(i X)`` for the i-th sample: integers whose
                 running mean is X (e.g. ``mean:45.5`` -> 46, 45, 46, 45, ...; ``mean:102.4``);
- ``trace:FILE`` per-sample lengths replayed from a previous run's ``samples.jsonl``
                 (matched by ``sample_id``; ids not in the trace take the trace's lengths in
                 file order, cycling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from stagewise.errors import InputError
from stagewise.results.records import read_samples


@dataclass
class OutputLenPolicy:
    """A parsed ``--output-len`` value; :meth:`length` gives a sample's token count.

    Raises (in :func:`parse_output_len`):
        ValueError: malformed spec; InputError: unreadable or empty trace file.
    """

    kind: str
    value: float = 0.0
    trace: dict[str, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    spec: str = ""

    def length(self, sample_id: str, index: int) -> int:
        """Tokens to generate (first token included) for the ``index``-th sample."""
        if self.kind == "fixed":
            return int(self.value)
        if self.kind == "mean":
            return max(1, round((index + 1) * self.value) - round(index * self.value))
        base = sample_id.split("@", 1)[0]
        if sample_id in self.trace:
            return self.trace[sample_id]
        if base in self.trace:
            return self.trace[base]
        return self.order[index % len(self.order)]


def parse_output_len(spec: str) -> OutputLenPolicy:
    """Parse ``fixed:N`` / ``mean:X`` / ``trace:FILE`` (see module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"output-len: fixed:N needs a whole number N >= 1, got {spec!r}")
        return OutputLenPolicy("fixed", int(arg), spec=spec)
    if kind == "mean":
        try:
            x = float(arg)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < 1:
            raise ValueError(f"output-len: mean:X needs a number X >= 1, got {spec!r}")
        return OutputLenPolicy("mean", x, spec=spec)
    if kind == "trace":
        recs = [r for r in read_samples(Path(arg)) if r.ok and r.n_output_tokens]
        if not recs:
            raise InputError(arg, "trace holds no finished sample with an output length")
        return OutputLenPolicy("trace", trace={r.sample_id: int(r.n_output_tokens) for r in recs}, order=[int(r.n_output_tokens) for r in recs], spec=spec)
    raise ValueError(f"output-len: expected fixed:N, mean:X or trace:FILE, got {spec!r}")
