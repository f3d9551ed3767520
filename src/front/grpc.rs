//! The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`, from
//! proto/inference.proto), and `grpc.health.v1` following readiness.
//!
//! Like the REST front ends, this one only decodes and encodes: request parameters become
//! the core's mode parameters, typed `contents` or `raw_input_contents` become wire tensors,
//! and the core's answer goes out in `raw_output_contents` (all tritonclient reads), with
//! the same names and derived MC outputs as OIP REST.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tract_onnx::prelude::Tensor;

use crate::core::mode::{ModeParams, Param};
use crate::core::tensors::{DataType, Values, WireTensor, model_inputs, rows_bound};
use crate::core::view::LoadedModel;
use crate::core::{Answer, Core, Inputs, MODEL_VERSION, PredictRequest, Protocol, check_version};
use crate::error::Error;
use crate::front::oip::EXTENSIONS;
use crate::front::oip::outputs::{PLATFORM, answer_outputs, input_meta, output_meta, select};
use crate::front::oip::types::AnswerParameters;

/// The generated protocol types and service traits.
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use pb::infer_parameter::ParameterChoice;
use pb::model_infer_request::InferRequestedOutputTensor;
use pb::model_metadata_response::TensorMetadata;

pub struct GrpcFront {
    core: Arc<Core>,
}

/// The gRPC service, with message limits equal to the HTTP body limit (tonic's default
/// of 4 MiB would refuse image batches the REST API takes).
pub fn service(core: Arc<Core>) -> GrpcInferenceServiceServer<GrpcFront> {
    let limit = core.limits.body_limit_bytes;
    // gzip both ways, as tritonclient offers (`compression_algorithm="gzip"`): a client
    // that sends gzip is read, and one that accepts gzip is answered in it. The decoding
    // limit applies to the message as decompressed.
    GrpcInferenceServiceServer::new(GrpcFront { core })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
}

/// `grpc.health.v1`: SERVING for the server ("") and the inference service exactly while
/// the server is ready.
pub async fn health(
    core: Arc<Core>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let mut ready = core.watch_ready();
    let set = |reporter: tonic_health::server::HealthReporter, up: bool| async move {
        let status = if up {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for name in ["", "inference.GRPCInferenceService"] {
            reporter.set_service_status(name, status).await;
        }
    };
    let up = *ready.borrow_and_update();
    set(reporter.clone(), up).await;
    tokio::spawn(async move {
        while ready.changed().await.is_ok() {
            let up = *ready.borrow_and_update();
            set(reporter.clone(), up).await;
        }
    });
    service
}

/// The inputs of a ModelInfer request, their values not converted yet.
struct GrpcInputs(Vec<WireTensor>);

impl Inputs for GrpcInputs {
    fn rows_bound(&self, _: &LoadedModel) -> usize {
        rows_bound(self.0.iter().map(|t| t.shape.as_slice()))
    }

    fn decode(self, model: &LoadedModel) -> Result<Vec<Tensor>, Error> {
        model_inputs(model, self.0)
    }
}

/// The binary-extension parameters are REST's; gRPC clients may still send them, and they
/// change nothing here.
const BINARY_PARAMS: [&str; 3] = ["binary_data_output", "binary_data", "binary_data_size"];

fn param(p: &pb::InferParameter) -> Option<Param> {
    Some(match p.parameter_choice.as_ref()? {
        ParameterChoice::BoolParam(b) => Param::Bool(*b),
        ParameterChoice::Int64Param(i) => Param::Int(*i),
        ParameterChoice::StringParam(s) => Param::Str(s.clone()),
        ParameterChoice::DoubleParam(d) => Param::Double(*d),
        ParameterChoice::Uint64Param(u) => Param::Uint(*u),
    })
}

fn mode_params(parameters: &HashMap<String, pb::InferParameter>) -> Result<ModeParams, Error> {
    let mut params = ModeParams::default();
    // Sorted, so that a request with several problems is always refused for the same one.
    let mut names: Vec<&String> = parameters.keys().collect();
    names.sort();
    for name in names {
        if BINARY_PARAMS.contains(&name.as_str()) {
            continue;
        }
        let value = param(&parameters[name])
            .ok_or_else(|| Error::InvalidParameter(format!("request parameter '{name}' has no value")))?;
        params.set(name, value, "request parameter")?;
    }
    Ok(params)
}

/// Inputs from `raw_input_contents` (one entry per input, in order) or typed `contents`,
/// never both.
fn wire_inputs(request: &mut pb::ModelInferRequest) -> Result<Vec<WireTensor>, Error> {
    let raw = std::mem::take(&mut request.raw_input_contents);
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(Error::InvalidValue(format!(
            "raw_input_contents has {} entries for {} inputs; send one per input, in order",
            raw.len(),
            request.inputs.len()
        )));
    }
    // Triton and KServe take one or the other; which one wins would be a guess.
    if !raw.is_empty()
        && let Some(both) = request.inputs.iter().find(|i| {
            i.contents
                .as_ref()
                .is_some_and(|c| *c != pb::InferTensorContents::default())
        })
    {
        return Err(Error::InvalidValue(format!(
            "input '{}' has typed contents and the request also has raw_input_contents; send the values one way",
            both.name
        )));
    }
    let mut raw = raw.into_iter();
    std::mem::take(&mut request.inputs)
        .into_iter()
        .map(|input| {
            let datatype = DataType::parse(&input.datatype)
                .map_err(|e| Error::InvalidValue(format!("input '{}': {e}", input.name)))?;
            let values = match raw.next() {
                Some(bytes) => Values::Raw(bytes),
                None => typed(&input.name, datatype, input.contents.unwrap_or_default())?,
            };
            Ok(WireTensor {
                name: input.name,
                datatype,
                shape: input.shape,
                values,
            })
        })
        .collect()
}

/// The typed contents field that holds `datatype`'s values.
fn typed(name: &str, datatype: DataType, c: pb::InferTensorContents) -> Result<Values, Error> {
    Ok(match datatype {
        DataType::Bool => Values::Bool(c.bool_contents),
        DataType::I8 | DataType::I16 | DataType::I32 => {
            Values::Int(c.int_contents.into_iter().map(i64::from).collect())
        }
        DataType::I64 => Values::Int(c.int64_contents),
        DataType::U8 | DataType::U16 | DataType::U32 => {
            Values::Uint(c.uint_contents.into_iter().map(u64::from).collect())
        }
        DataType::U64 => Values::Uint(c.uint64_contents),
        DataType::F32 => Values::F32(c.fp32_contents),
        DataType::F64 => Values::F64(c.fp64_contents),
        DataType::Bytes => Values::Bytes(c.bytes_contents),
        DataType::F16 => {
            return Err(Error::InvalidValue(format!(
                "input '{name}': FP16 has no typed contents field; send it in raw_input_contents"
            )));
        }
    })
}

fn encode(
    model: &LoadedModel,
    answer: Answer,
    id: String,
    requested: Vec<InferRequestedOutputTensor>,
) -> Result<pb::ModelInferResponse, Error> {
    let (outputs, parameters) = answer_outputs(model, answer)?;
    let requested = (!requested.is_empty()).then_some(requested);
    let chosen = select(model, outputs, requested, |r: &InferRequestedOutputTensor| {
        r.name.as_str()
    })?;
    let mut response = pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: MODEL_VERSION.into(),
        id,
        parameters: response_parameters(&parameters)?,
        ..Default::default()
    };
    for (o, _) in chosen {
        response.raw_output_contents.push(o.bytes()?);
        response.outputs.push(pb::model_infer_response::InferOutputTensor {
            name: o.name,
            datatype: o.datatype.as_str().into(),
            shape: o.shape.iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
    }
    Ok(response)
}

/// The answer's parameters (mode, and for MC the run) as gRPC values: the fields the REST
/// answer's `parameters` has, by the same names.
fn response_parameters(parameters: &AnswerParameters) -> Result<HashMap<String, pb::InferParameter>, Error> {
    let parameters =
        serde_json::to_value(parameters).map_err(|e| Error::Internal(format!("encoding the parameters: {e}")))?;
    let mut out = HashMap::new();
    for (k, v) in parameters.as_object().into_iter().flatten() {
        let choice = match v {
            serde_json::Value::String(s) => ParameterChoice::StringParam(s.clone()),
            serde_json::Value::Bool(b) => ParameterChoice::BoolParam(*b),
            serde_json::Value::Number(n) if n.is_i64() => ParameterChoice::Int64Param(n.as_i64().unwrap_or_default()),
            serde_json::Value::Number(n) if n.is_u64() => ParameterChoice::Uint64Param(n.as_u64().unwrap_or_default()),
            serde_json::Value::Number(n) => ParameterChoice::DoubleParam(n.as_f64().unwrap_or_default()),
            _ => continue,
        };
        out.insert(
            k.clone(),
            pb::InferParameter {
                parameter_choice: Some(choice),
            },
        );
    }
    Ok(out)
}

impl GrpcFront {
    /// Predict and metadata calls carry the key as HTTP does, in `authorization` metadata;
    /// liveness and readiness stay open for probes.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let values: Vec<&[u8]> = request
            .metadata()
            .get_all("authorization")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        Ok(self.core.authorize(Protocol::Grpc, &values)?)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcFront {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.core.not_ready_reasons().is_empty();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        check_version(&r.name, Some(&r.version))?;
        let ready = self.core.model_ready(&r.name)?;
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "mcd-serve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        check_version(&r.name, Some(&r.version))?;
        let model = self.core.model(Some(&r.name))?;
        let tensor = |name: String, dt: DataType, shape: Vec<i64>| TensorMetadata {
            name,
            datatype: dt.as_str().into(),
            shape,
        };
        let outputs = output_meta(&model)?;
        // TensorMetadata has no parameters field: the MC-only outputs are listed here.
        let mc_only: Vec<&str> = outputs.iter().filter(|o| o.mc_only).map(|o| o.name.as_str()).collect();
        let properties = HashMap::from([
            (
                "mc_available".to_string(),
                model.mc_unavailable_reason().is_none().to_string(),
            ),
            ("mc_only_outputs".to_string(), mc_only.join(",")),
            ("dropout_sites".to_string(), model.sampling_sites().to_string()),
            (
                "output_kinds".to_string(),
                serde_json::Value::Object(model.output_kinds_by_name()).to_string(),
            ),
        ]);
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.name.clone(),
            versions: vec![MODEL_VERSION.into()],
            platform: PLATFORM.into(),
            inputs: input_meta(&model)?
                .into_iter()
                .map(|(n, dt, s)| tensor(n, dt, s))
                .collect(),
            outputs: outputs
                .iter()
                .map(|o| tensor(o.name.clone(), o.datatype, o.shape.clone()))
                .collect(),
            properties,
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        self.authorize(&request)?;
        let mut r = request.into_inner();
        let model = r.model_name.clone();
        let decoded = check_version(&model, Some(&r.model_version))
            .and_then(|()| Ok((mode_params(&r.parameters)?, wire_inputs(&mut r)?)));
        let (mut params, inputs) = match decoded {
            Ok(d) => d,
            Err(e) => {
                let label = crate::core::mode::asked_for(r.parameters.keys());
                return Err(self.core.refuse(Protocol::Grpc, Some(&model), label, e).into());
            }
        };
        let (id, requested) = (r.id, r.outputs);
        if !requested.is_empty() {
            params.outputs = Some(requested.iter().map(|o| o.name.clone()).collect());
        }
        let request = PredictRequest {
            protocol: Protocol::Grpc,
            model: Some(model),
            params,
            inputs: GrpcInputs(inputs),
        };
        let reply = self
            .core
            .predict(request, move |m: &LoadedModel, a: Answer| encode(m, a, id, requested))
            .await;
        let mut response = Response::new(reply.result?);
        response.metadata_mut().insert(
            "x-inference-mode",
            tonic::metadata::MetadataValue::from_static(reply.mode.as_str()),
        );
        Ok(response)
    }
}
