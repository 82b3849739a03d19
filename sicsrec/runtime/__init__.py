"""The runtime layer, at the bottom of the package order (see docs/architecture.md, "Packages"):
distributed init from torchrun / DeepSpeed / SLURM (`dist`) and run directories with stage
manifests (`rundir`). It imports no other sicsrec module, so shards/, llm_labeling/, the
trainers and the launcher can all stand on it. Import the submodules themselves (this file
imports nothing: `rundir` must stay usable without loading torch)."""
