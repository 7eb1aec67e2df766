"""Training VIST2: the paper's four stages (PT-1 caption, PT-2 multi-turn OCR with a curriculum,
PT-3 optical language modelling, SFT) on ``accelerate``.

    vist2 data prepare --out data
    vist2 train --stage olm --model runs/tiny --data data/text_en.jsonl --out runs/olm --max-steps 100

Parts: :mod:`.config` (stage presets as dataclasses, YAML), :mod:`.data` (readers),
:mod:`.stages` (record -> laid-out samples, curriculum, packing), :mod:`.pipeline`
(the batch stream, samples dealt to the ranks, rendering in DataLoader workers),
:mod:`.checkpoint` (atomic saves), :mod:`.launch` (the accelerator; a launch must be one
job), :mod:`.trainer`, :mod:`.prepare` (demo corpora), :mod:`.cli`.
"""

from .config import STAGES, CurriculumPhase, LoRAConfig, TrainConfig, load_config, stage_preset

__all__ = ["STAGES", "CurriculumPhase", "LoRAConfig", "TrainConfig", "load_config", "stage_preset"]
