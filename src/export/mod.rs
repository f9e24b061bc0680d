pub mod gif;
pub mod sheet;
