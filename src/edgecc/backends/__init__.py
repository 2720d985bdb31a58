"""Native code generation: targets, the llvmlite driver, kernel lowerings, the entry emitter and runtimes."""
