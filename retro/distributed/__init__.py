"""Distributed setup and parallelism: process group and mesh, AC -> compile -> FSDP2, sharded loading."""
