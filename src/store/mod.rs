//! Store adapters: implementations of the core's [`canopy_actors::store::Store`] port.

pub mod embedded;

pub use embedded::EmbeddedStore;
