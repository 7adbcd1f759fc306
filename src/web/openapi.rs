//! The API's OpenAPI 3.1 contract, generated from the view types and the
//! handlers' annotations. The committed copy is `docs/openapi.json`; a test
//! keeps it equal to this.
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "demiarch-sessions",
        description = "The operator API of a demiarch-sessions store: sessions, agents, locks \
                       and the audit log, and the actions an operator takes on them. Paths are \
                       relative to where the dashboard is mounted.",
    ),
    paths(
        api::openapi,
        api::sessions,
        api::session,
        api::end,
        api::pause,
        api::unpause,
        api::finish,
        api::locks,
        api::release,
        api::audit,
        api::activity,
        api::recover,
        api::prune,
    ),
    modifiers(&Bearer, &EveryOperation),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What every operation may answer besides its own statuses: the access
/// policy's refusals, and the one-line error of a malformed request.
struct EveryOperation;

impl Modify for EveryOperation {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [item.get.as_mut(), item.post.as_mut()];
            for operation in operations.into_iter().flatten() {
                // Without parameters or a body, nothing can be malformed.
                let takes_input = operation.parameters.as_ref().is_some_and(|p| !p.is_empty())
                    || operation.request_body.is_some();
                let responses = &mut operation.responses.responses;
                for (status, description) in [
                    ("400", "A malformed parameter or body, named in the message"),
                    ("401", "Missing or wrong credentials"),
                    ("403", "Refused by the access policy, read-only access to an action, or a change from another site"),
                    ("413", "A body over 16 KiB"),
                ] {
                    if status == "400" && !takes_input {
                        continue;
                    }
                    if status == "413" && operation.request_body.is_none() {
                        continue;
                    }
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
        openapi
            .components
            .get_or_insert_with(Default::default)
            .schemas
            .entry("ErrorBody".to_owned())
            .or_insert_with(<super::error::ErrorBody as utoipa::PartialSchema>::schema);
    }
}

/// The OpenAPI 3.1 document of the JSON API, pretty-printed.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}"))
}
