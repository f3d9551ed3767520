//! ONNX graph surgery, done on the protobuf before tract sees a model.
//!
//! tract runs `Dropout` as the identity, or refuses it outright when it is exported in
//! training mode, and it cannot run BatchNormalization exported with `training_mode=1`.
//! So we build two graphs from every file:
//! - the *eval* graph, where each Dropout is an `Identity` (its mask output, if used, is all
//!   true) and every BatchNormalization runs on its running statistics;
//! - the *MC* graph, where each Dropout with a ratio > 0 becomes `Mul(x, mask)` and `mask`
//!   is a new graph input that the server samples (inverted dropout: 0 or 1/(1-p)).
//!
//! Dropout written as random ops (PyTorch's `Dropout1d/2d/3d` and `AlphaDropout`, see
//! [`decomposed`]) becomes a site too: the identity in eval, and in MC a mask
//! input shaped like the file's own draw (e.g. [batch, C, 1, 1] for channel dropout), which
//! the `Mul` broadcasts. Any other random op is refused at load.
//!
//! Masks must stay graph inputs: tract folds any stateless node whose value is known, so a
//! mask stored as an initializer would be constant-folded away.
//!
//! The folder, leaf first: [`proto`] (protobuf helpers), [`sites`] (what a dropout site is),
//! [`decomposed`] (dropout written as random ops), [`external`] (weights in a data file),
//! [`analyse`] (finding the sites and fixing BatchNorm), [`rewrite`] (the graphs built from
//! them). This file only declares and re-exports.

mod analyse;
pub mod decomposed;
mod external;
mod index_inputs;
pub mod proto;
mod rewrite;
mod sites;

pub use analyse::analyse;
pub use external::check_external_data;
pub use index_inputs::index_limits;
pub use proto::opset;
pub use sites::*;

#[cfg(test)]
mod site_tests;
#[cfg(test)]
mod tests;
