//! What a dropout site is: its kind, ratio and mask, and what the surgery hands the plans.

use anyhow::bail;
use serde::Serialize;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

use super::decomposed::{Form, MaskTemplate};
use crate::engine::spec::Dim;

/// Names of the mask inputs added to the MC graph.
pub const MASK_INPUT_PREFIX: &str = "mcd_dropout_mask_";

/// How a site drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// One draw per element of the activation (`Dropout`, `nn.Dropout`).
    Element,
    /// One draw per (row, channel), broadcast over the rest (`Dropout1d/2d/3d`).
    Channel,
    /// A draw of some other shape that broadcasts into the activation.
    Broadcast,
    /// Alpha dropout: a dropped unit takes SELU's saturation value and an affine map keeps
    /// the mean and variance (`AlphaDropout`, `FeatureAlphaDropout`).
    Alpha,
}

/// Alpha dropout's two branches, as read from the file's constants.
#[derive(Debug, Clone, Serialize)]
pub struct AlphaCorrection {
    /// A kept unit becomes `scale`·x + `kept_offset`...
    pub scale: f64,
    pub kept_offset: f64,
    /// ...and a dropped one `dropped_offset`.
    pub dropped_offset: f64,
    /// α: the saturation value -α of SELU that the correction assumes.
    pub saturation: f64,
}

/// One dropout site of the file, as found at load: a Dropout node, or a dropout written as
/// random ops.
#[derive(Debug, Clone, Serialize)]
pub struct DropoutSite {
    /// The node's name (or its first output's name when the node has none); for a dropout
    /// written as random ops, the node whose output is the dropped activation.
    pub node: String,
    pub kind: SiteKind,
    /// 1 - ratio, when the file fixes it.
    pub keep_probability: Option<f32>,
    /// The ratio, when the file fixes it.
    pub ratio: Option<f32>,
    /// Where the ratio came from: attribute, constant, initializer, default, graph input.
    pub ratio_source: String,
    /// How the file exported `training_mode`. It is informative only: eval never drops,
    /// MC always drops at sites with ratio > 0.
    pub exported_training_mode: String,
    pub mask_output_used: bool,
    /// The shape of the mask the server samples (it broadcasts into the activation), once
    /// typing has told it.
    pub mask_shape: Option<Vec<Dim>>,
    /// For a dropout written as random ops: the nodes it was recognised from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha_correction: Option<AlphaCorrection>,
    #[serde(skip)]
    pub(crate) input: String,
    #[serde(skip)]
    pub(crate) output: String,
    #[serde(skip)]
    pub(crate) mask_output: Option<String>,
    /// Every node the site replaces; the replacement goes where `anchor` was.
    #[serde(skip)]
    pub(crate) nodes: Vec<usize>,
    #[serde(skip)]
    pub(crate) anchor: usize,
    /// Graph inputs that fed only this node's ratio or training_mode.
    #[serde(skip)]
    pub(crate) control_inputs: Vec<String>,
    /// For a dropout written as random ops: where its mask's shape comes from, and what it
    /// computes. None for a Dropout node (its mask has the input's shape; it scales by
    /// 1/(1-ratio)).
    #[serde(skip)]
    pub(crate) template: Option<MaskTemplate>,
    #[serde(skip)]
    pub(crate) form: Option<Form>,
}

/// The values of one mask input: what a kept and a dropped unit get, and the value that
/// keeps everything as eval does (the p -> 0 limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskValues {
    pub kept: f64,
    pub dropped: f64,
    pub unit: f64,
}

impl DropoutSite {
    /// A site the MC graph samples at.
    pub fn samples(&self) -> bool {
        self.ratio.is_some_and(|r| r > 0.0)
    }

    /// The mask inputs of this site, all drawn from the same keep/drop draws: one that
    /// multiplies the activation, and for alpha dropout a second one that is added.
    pub fn mask_values(&self) -> Vec<MaskValues> {
        match self.form {
            Some(Form::Scale { scale }) => vec![MaskValues {
                kept: scale,
                dropped: 0.0,
                unit: 1.0,
            }],
            Some(Form::Alpha {
                scale,
                kept_offset,
                dropped_offset,
                ..
            }) => vec![
                MaskValues {
                    kept: scale,
                    dropped: 0.0,
                    unit: 1.0,
                },
                MaskValues {
                    kept: kept_offset,
                    dropped: dropped_offset,
                    unit: 0.0,
                },
            ],
            None => vec![MaskValues {
                kept: 1.0 / (1.0 - self.ratio.unwrap_or(0.0) as f64),
                dropped: 0.0,
                unit: 1.0,
            }],
        }
    }

    /// Where the typed shape probe must also read the mask's own shape.
    pub(crate) fn template_tensor(&self) -> Option<&str> {
        match &self.template {
            Some(MaskTemplate::Like(t)) => Some(t),
            _ => None,
        }
    }

    /// The mask's shape when the file fixes it.
    pub(crate) fn static_mask_shape(&self) -> Option<Vec<Dim>> {
        match &self.template {
            Some(MaskTemplate::Static(dims)) => Some(dims.iter().map(|&d| Dim::Fixed(d)).collect()),
            _ => None,
        }
    }

    /// Sets the mask's shape, and with it the kind, once typing has told the activation's
    /// shape. Refuses a mask that does not broadcast into the activation: replacing the
    /// site by the identity in eval would then change the output's shape.
    pub(crate) fn set_mask_shape(&mut self, activation: &[Dim], mask: Vec<Dim>) -> anyhow::Result<()> {
        let fits = mask.len() <= activation.len()
            && mask
                .iter()
                .rev()
                .zip(activation.iter().rev())
                .all(|(m, a)| m == a || *m == Dim::Fixed(1));
        if !fits {
            bail!(
                "the random draw of dropout site '{}' has shape {}, which does not broadcast into \
                 the activation it drops, of shape {}; the model is refused",
                self.node,
                crate::engine::model::shape_string(&mask),
                crate::engine::model::shape_string(activation)
            );
        }
        if self.kind != SiteKind::Alpha {
            let channel = mask.len() == activation.len()
                && mask.len() >= 3
                && mask[..2] == activation[..2]
                && mask[2..].iter().all(|d| *d == Dim::Fixed(1))
                && activation[2..].iter().any(|d| *d != Dim::Fixed(1));
            self.kind = if mask == activation {
                SiteKind::Element
            } else if channel {
                SiteKind::Channel
            } else {
                SiteKind::Broadcast
            };
        }
        self.mask_shape = Some(mask);
        Ok(())
    }
}

/// What graph surgery learned about a file, and the eval graph it built.
pub struct Surgery {
    pub sites: Vec<DropoutSite>,
    /// Changes made so the file is served correctly, for the model's report.
    pub fixes: Vec<String>,
    /// Why MC cannot be offered, when the file alone decides it.
    pub mc_blocker: Option<String>,
    pub eval_proto: ModelProto,
    pub(super) base: ModelProto,
}

/// Where the typed shape probe holds a tensor's fact.
#[derive(Debug, Clone, Copy)]
pub enum FactAt {
    Input(usize),
    Output(usize),
}

/// A mask input of the MC graph. Its shape is the site's mask shape: the Dropout's input
/// shape, or the shape of the file's own draw. The masks of one site are consecutive and
/// drawn from the same keep/drop draws.
#[derive(Debug, Clone)]
pub struct MaskInput {
    pub site: usize,
    pub name: String,
    pub ratio: f32,
    pub values: MaskValues,
    pub datum: DatumType,
    pub shape: Vec<Dim>,
}

/// What the typed shape probe tells about a site: its activation's fact, and where the
/// mask's own shape is when the file's draw has a shape of its own.
#[derive(Debug, Clone, Copy)]
pub struct ProbeLookup {
    pub site: usize,
    pub activation: FactAt,
    pub template: Option<FactAt>,
}
