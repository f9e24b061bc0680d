pub mod csv;
pub mod gif;
pub mod npy;
pub mod sheet;
pub mod tensorboard;
