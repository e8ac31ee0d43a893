"""Tasks run on a trained checkpoint: captioning now; the finetuning tasks (retrieval, VQA, NLVR2, VE) come with the finetuning issue."""
