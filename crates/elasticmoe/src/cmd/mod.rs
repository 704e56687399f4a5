//! One module per subcommand.

pub mod demo;
pub mod gen_model;
pub mod generate;
pub mod serve;
