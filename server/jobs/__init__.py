"""Background jobs and the training they run: learned composition weights (LoraHub), compositions learned
by gradient with skill expansion, library compression, and LoRA training itself."""
