"""The one error of student training that is the user's to fix, not a bug."""


class TrainSetupError(ValueError):
    """A run that cannot start as configured (too few shards for the ranks, a checkpoint of another
    split, a validation OUTPUT without ground truth), found before the first step: the CLI prints
    it on one line and exits 2."""
