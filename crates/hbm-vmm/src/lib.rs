//! `hbm-vmm`: device memory as virtual memory (work in progress).
