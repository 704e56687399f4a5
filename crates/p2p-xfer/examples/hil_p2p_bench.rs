//! GPU benchmark (work in progress).
fn main() {}
