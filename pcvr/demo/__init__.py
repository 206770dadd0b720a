"""Demo data in the competition layout with planted, known signals (``generator`` and the
modules it uses), and ``oracle``, which reads the truth it leaves beside the data."""
