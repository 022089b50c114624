"""What the services share about models: where a reference points (``sources``), how
every diffusers pipeline is built (``pipelines``), the fine-tuned model format and
its writer (``manifest``, ``export``), the subject scores (``subject_scores``), and
device and dtype choice (``runtime``)."""
