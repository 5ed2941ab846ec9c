"""The Triton backend: the op wrappers (backend), dense and top-k kernels and their launch
configurations, and the kept-class bitmask of a top-k teacher."""
