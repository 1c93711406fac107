//! Store adapters: implementations of the core's [`canopy_actors::store::Store`] (write) and
//! [`canopy_actors::store::StoreRead`] (query) ports.

pub mod embedded;
pub mod multi;
pub mod scylla;

pub use embedded::EmbeddedStore;
pub use multi::{open_all, partition_dir, MultiRead};
