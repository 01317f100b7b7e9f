"""DeepSpeed: its JSON's settings on our flags (``config``), its engine behind ``--deepspeed``
(``engine``). Importing this package does not import DeepSpeed."""
