"""The settings of ``deltatune inspect``: one typed, validated config."""

from __future__ import annotations

from dataclasses import dataclass, field

from deltatune.config import require


@dataclass
class InspectOptions:
    base: str | None = field(default=None, metadata={
        "help": "base-model folder (default: the base the first delta records); required for full checkpoints"})
    out: str | None = field(default=None, metadata={"help": "report folder: PNG plots, report.html, report.json"})
    labels: list[str] | None = field(default=None, metadata={"help": "a short name per input (default: its path)"})
    epsilon: float = field(default=0.5, metadata={
        "help": "intruder threshold ε on max |cos| (PEFT's default in reduce_intruder_dimension; the paper sweeps ε)"})
    intruder_k: int = field(default=10, metadata={"help": "top-k singular vectors of W + ΔW examined for intruders"})
    align_k: int = field(default=16, metadata={"help": "top-k singular directions of W for the alignment ratio"})
    angles_rank: int = field(default=8, metadata={"help": "dimension of the ΔW subspaces compared by principal angles"})
    spectrum_len: int = field(default=32, metadata={"help": "singular values of ΔW kept per matrix"})
    svd_full_max: int = field(default=4096, metadata={
        "help": "exact SVD up to this min(m, n); larger matrices use torch.svd_lowrank"})
    svd_rank: int = field(default=256, metadata={"help": "rank q of the randomised SVD"})
    trim_density: float = field(default=0.2, metadata={
        "help": "TIES trim level for the conflict mass (fraction of entries kept per tensor; TIES' k = 20%)"})
    tol: float = field(default=1e-5, metadata={
        "help": "|Δ| ≤ tol counts as unchanged for density_tol (Mukherjee et al.'s default)"})
    sparse_below: float = field(default=0.5, metadata={
        "help": "a tensor with density below this gets the placement analysis (rows, columns, heads)"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots and the HTML report into out"})
    overwrite: bool = field(default=False, metadata={"help": "replace an out folder that is not an earlier report"})
    verify: bool = field(default=True, metadata={"help": "check the deltas' digests"})
    force: bool = field(default=False, metadata={"help": "inspect deltas of different bases together anyway"})
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        require(0.0 < self.epsilon <= 1.0, f"inspect epsilon must be in (0, 1], got {self.epsilon!r}")
        for name in ("intruder_k", "align_k", "angles_rank", "spectrum_len", "svd_full_max", "svd_rank"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"inspect {name} must be an integer ≥ 1, got {value!r}")
        require(0.0 < self.trim_density <= 1.0, f"inspect trim_density must be in (0, 1], got {self.trim_density!r}")
        require(self.tol >= 0.0, f"inspect tol must be ≥ 0, got {self.tol!r}")
        require(0.0 < self.sparse_below <= 1.0, f"inspect sparse_below must be in (0, 1], got {self.sparse_below!r}")
        require(self.labels is None or (len(set(self.labels)) == len(self.labels) and all(self.labels)),
                f"inspect labels must be distinct and non-empty, got {self.labels!r}")
