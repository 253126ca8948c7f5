"""SmolLM2-135M-Instruct (GGUF) retrofitted to depth recurrence on 2 CPU cores: `python -m benchmarks.real_retrofit`.

__main__ runs the experiment (docs/real_retrofit.md); stages holds its reusable steps (convert_model,
prepare_data, train, eval_losses, gsm8k_accuracy), metrics reads and sums up what they wrote, report
writes results.json, results.md and the plots.
"""
