//! `config::load` end to end: real files, the errors a person would see for each kind of mistake.

use std::path::{Path, PathBuf};

use isthmus_runtime::config::{self, ConfigError, FieldError, HumanDuration, Port, Validate};
use serde::Deserialize;
use tempfile::TempDir;

/// A config shaped like the binaries' ones: nested structs, a list, validated newtypes.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Gateway {
    /// Name of this gateway.
    name: String,
    /// How long to wait for connections to finish at shutdown.
    #[serde(default = "default_grace")]
    grace: HumanDuration,
    /// Where to send traffic.
    routes: Vec<Route>,
}

fn default_grace() -> HumanDuration {
    HumanDuration::from_secs(5)
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Route {
    /// Host name to match.
    host: String,
    /// Port to dial.
    port: Port,
}

impl Validate for Gateway {
    fn validate(&self) -> Result<(), FieldError> {
        if self.routes.is_empty() {
            return Err(FieldError::new("routes", "at least one route"));
        }
        self.routes.validate().map_err(|e| e.within("routes"))
    }
}

impl Validate for Route {
    fn validate(&self) -> Result<(), FieldError> {
        if self.host.is_empty() {
            return Err(FieldError::new("host", "a non-empty host name"));
        }
        Ok(())
    }
}

fn write(dir: &TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn load(text: &str) -> (PathBuf, Result<Gateway, ConfigError>) {
    let dir = TempDir::new().expect("tempdir");
    let path = write(&dir, text);
    let result = config::load::<Gateway>(&path);
    (path, result)
}

#[test]
fn valid_file_loads_with_defaults() {
    let (_, result) = load("name: edge\nroutes:\n  - host: a.apps.internal\n    port: 8080\n");
    let gateway = result.expect("valid config");
    assert_eq!(gateway.name, "edge");
    assert_eq!(gateway.grace, HumanDuration::from_secs(5));
    assert_eq!(gateway.routes[0].port, Port::new(8080).unwrap());
}

#[test]
fn unknown_field_names_file_field_and_valid_fields() {
    let (path, result) = load("name: edge\nroutes:\n  - host: a\n    prot: 8080\n");
    let err = result.unwrap_err();
    let ConfigError::Parse {
        field,
        line,
        message,
        ..
    } = &err
    else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "routes[0].prot");
    assert_eq!(*line, Some(4));
    assert_eq!(message, "unknown field `prot`, expected `host` or `port`");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("field `routes[0].prot`"), "{text}");
    assert!(text.contains("expected `host` or `port`"), "{text}");
}

#[test]
fn wrong_type_at_nested_path_names_path_and_line() {
    let (path, result) =
        load("name: edge\nroutes:\n  - host: a\n    port: 80\n  - host: b\n    port: http\n");
    let err = result.unwrap_err();
    let ConfigError::Parse {
        field,
        line,
        column,
        message,
        ..
    } = &err
    else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "routes[1].port");
    assert_eq!((*line, *column), (Some(6), Some(11)));
    assert_eq!(
        message,
        "invalid type: string \"http\", expected a port in 1..=65535"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "invalid configuration in {}:6:11: field `routes[1].port`: invalid type: string \
             \"http\", expected a port in 1..=65535",
            path.display()
        )
    );
}

#[test]
fn port_out_of_range_is_a_parse_error_at_its_field() {
    // serde_norway reports a negative number as the wrong type for an unsigned field.
    let cases = [
        ("0", "invalid value: integer `0`"),
        ("70000", "invalid value: integer `70000`"),
        ("-1", "invalid type: integer `-1`"),
    ];
    for (value, shown) in cases {
        let (_, result) = load(&format!(
            "name: e\nroutes:\n  - host: a\n    port: {value}\n"
        ));
        let err = result.unwrap_err();
        let ConfigError::Parse { field, message, .. } = &err else {
            panic!("want Parse, got {err:?}");
        };
        assert_eq!(field, "routes[0].port");
        assert_eq!(message, &format!("{shown}, expected a port in 1..=65535"));
    }
}

#[test]
fn duration_errors_name_the_field_and_the_rule() {
    let (_, result) = load("name: e\ngrace: 30\nroutes:\n  - host: a\n    port: 1\n");
    let err = result.unwrap_err();
    let ConfigError::Parse { field, message, .. } = &err else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "grace");
    // YAML hands `30` over as a string when one is asked for, so the bare number reaches our
    // parser and gets the specific reason.
    assert_eq!(
        message,
        &format!(
            "invalid duration \"30\": it has no unit; expected {}",
            HumanDuration::EXPECTED
        )
    );

    let (_, result) = load("name: e\ngrace: [5s]\nroutes:\n  - host: a\n    port: 1\n");
    let err = result.unwrap_err();
    let ConfigError::Parse { field, message, .. } = &err else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "grace");
    assert_eq!(
        message,
        &format!(
            "invalid type: sequence, expected {}",
            HumanDuration::EXPECTED
        )
    );

    let (_, result) = load("name: e\ngrace: 30x\nroutes:\n  - host: a\n    port: 1\n");
    let err = result.unwrap_err();
    let ConfigError::Parse { field, message, .. } = &err else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "grace");
    assert!(
        message.starts_with("invalid duration \"30x\": unknown unit \"x\""),
        "{message}"
    );
}

#[test]
fn validate_failure_is_invalid_naming_the_field() {
    let (path, result) =
        load("name: edge\nroutes:\n  - host: a\n    port: 1\n  - host: ''\n    port: 2\n");
    let err = result.unwrap_err();
    let ConfigError::Invalid {
        path: err_path,
        field,
        expected,
    } = &err
    else {
        panic!("want Invalid, got {err:?}");
    };
    assert_eq!(err_path, &path);
    assert_eq!(field, "routes[1].host");
    assert_eq!(expected, "a non-empty host name");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid configuration in {}: field `routes[1].host`: expected a non-empty host name",
            path.display()
        )
    );

    let (_, result) = load("name: edge\nroutes: []\n");
    assert!(
        matches!(result, Err(ConfigError::Invalid { ref field, .. }) if field == "routes"),
        "{result:?}"
    );
}

#[test]
fn missing_file_is_a_read_error_naming_the_path() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let err = config::load::<Gateway>(&path).unwrap_err();
    let ConfigError::Read {
        path: err_path,
        source,
    } = &err
    else {
        panic!("want Read, got {err:?}");
    };
    assert_eq!(err_path, &path);
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(
        err.to_string(),
        format!("cannot read configuration file {}", path.display())
    );
}

#[test]
fn missing_required_field_and_broken_yaml_are_parse_errors() {
    let err = config::from_str::<Gateway>("routes: []\n", Path::new("inline")).unwrap_err();
    let ConfigError::Parse { field, message, .. } = &err else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "");
    assert!(message.contains("missing field `name`"), "{message}");
    assert!(
        err.to_string()
            .starts_with("invalid configuration in inline"),
        "{err}"
    );

    let err =
        config::from_str::<Gateway>("name: 'unterminated\n", Path::new("inline")).unwrap_err();
    let ConfigError::Parse {
        field,
        line,
        message,
        ..
    } = &err
    else {
        panic!("want Parse, got {err:?}");
    };
    assert_eq!(field, "name");
    assert_eq!(*line, Some(2));
    assert_eq!(
        message,
        "found unexpected end of stream, while scanning a quoted scalar at line 1 column 7"
    );
}
