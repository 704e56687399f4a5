//! The CUDA transport (work in progress).
