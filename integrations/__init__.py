"""Integrations with training stacks and the command line, not model families.

  * `hf_trainer`: `TheseusTrainer` / `TheseusCallback` for the transformers Trainer;
  * `lightning`: `TheseusCallback` for `lightning.Trainer`;
  * `deepspeed`: `ZeroExport`, the export of a model DeepSpeed ZeRO (stage 3 too) trained;
  * `cli_runner`: what every ``theseus-compress`` task shares (engine set-up, report);
  * `cli_text`, `cli_image`: the CLI's text-classification and image-classification tasks.

Each imports its model library itself, so ``import theseus_general`` never does.
"""
