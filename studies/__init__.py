"""Studies: long, resumable experiments about the service's behaviour (not its speed, which
lives in ``bench/``). Run from the repository root; see each study's README."""
