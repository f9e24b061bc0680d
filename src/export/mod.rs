pub mod sheet;
pub mod gif;
