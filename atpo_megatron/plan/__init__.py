"""`atpo plan`: the memory and step-time model of a job (shapes, memory, timing) and its command."""
