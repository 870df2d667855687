"""Weight merging of checkpoints and LoRAs: the methods declared once in ``registry`` (pure
tensor functions in ``methods``), applied to whole models live (``live``) or from files
(``stream``)."""
