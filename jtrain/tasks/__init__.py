"""Task front ends: HF's example-script arguments (`run_clm.py`, `run_classification.py`,
`run_mlm.py`) translated onto `python -m jtrain.run`'s one code path (see `jtrain.tasks.hf_args`)."""
