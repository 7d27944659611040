//! `configMap`: a ConfigMap key holding one id per line, or CSV with a header.
//!
//! The value is read once when the source is opened; a ConfigMap holds at most 1 MiB, so
//! keeping it is cheap, and the members are still produced in batches.

use futures::stream;

use super::formats::{CsvRows, FormatError};
use super::{BATCH_ROWS, BatchBuilder, MemberBatch, MemberSource, MemberStream, SourceContext, SourceError};
use crate::api::{ConfigMapFormat, ConfigMapSource};
use crate::domain::identifiers::{IdentifierFields, SkipReason, Value};

pub struct ConfigMapMembers {
    what: String,
    data: Vec<u8>,
    format: ConfigMapFormat,
    column: String,
    fields: IdentifierFields,
}

impl std::fmt::Debug for ConfigMapMembers {
    /// The value's size, not its up to 1 MiB of bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMapMembers")
            .field("what", &self.what)
            .field("bytes", &self.data.len())
            .field("format", &self.format)
            .field("column", &self.column)
            .field("fields", &self.fields)
            .finish()
    }
}

impl ConfigMapMembers {
    /// Reads the key and checks the mapping can find its field in it.
    pub async fn open(
        spec: &ConfigMapSource,
        fields: IdentifierFields,
        ctx: &impl SourceContext,
    ) -> Result<Self, SourceError> {
        let what = format!("ConfigMap {}/{} key {}", ctx.namespace(), spec.name, spec.key);
        if spec.format == ConfigMapFormat::Lines && !fields.field_names().contains(&spec.column.as_str()) {
            return Err(SourceError::Config {
                what,
                message: format!(
                    "each line is read into the field {:?} (configMap.column), but identifiers reads {:?}; name the same field in both",
                    spec.column,
                    fields.field_names()
                ),
            });
        }
        let data = ctx.config_map_value(&spec.name, &spec.key).await?;
        Ok(ConfigMapMembers::from_data(what, data, spec, fields))
    }

    /// A source over a value already read (`what` names it in messages).
    pub fn from_data(what: String, data: Vec<u8>, spec: &ConfigMapSource, fields: IdentifierFields) -> Self {
        ConfigMapMembers { what, data, format: spec.format, column: spec.column.clone(), fields }
    }

    /// `Lines`: each line, without surrounding whitespace (hand-edited lists and YAML block
    /// scalars carry indentation and `\r`), is the value of `column`. Blank lines count as
    /// missing ids; the newline ending the last line makes no row.
    fn line_batches(&self) -> impl Iterator<Item = Result<MemberBatch, SourceError>> + '_ {
        let data = self.data.strip_suffix(b"\n").unwrap_or(&self.data);
        let mut lines = (!data.is_empty()).then(|| data.split(|&b| b == b'\n')).into_iter().flatten().peekable();
        std::iter::from_fn(move || {
            lines.peek()?;
            let mut batch = BatchBuilder::default();
            for line in lines.by_ref().take(BATCH_ROWS) {
                let value = line.trim_ascii();
                if value.is_empty() {
                    batch.skip(SkipReason::Missing);
                    continue;
                }
                batch.push(
                    self.fields.resolve(|name| if name == self.column { Value::Bytes(value) } else { Value::Null }),
                );
            }
            Some(Ok(batch.take()))
        })
    }

    fn format_error(&self, e: FormatError) -> SourceError {
        match e {
            FormatError::Malformed { format, location, message } => {
                SourceError::Malformed { what: self.what.clone(), format, location, message }
            }
            FormatError::MissingColumn { column, header } => SourceError::Config {
                what: self.what.clone(),
                message: FormatError::missing_column_message(&column, &header),
            },
            // Reading from memory cannot fail, nor can a row be longer than the value; kept
            // for completeness of the match.
            FormatError::RowTooLarge { format, location, .. } => SourceError::Malformed {
                what: self.what.clone(),
                format,
                location,
                message: "a row longer than the value".to_owned(),
            },
            FormatError::Io(e) => SourceError::Malformed {
                what: self.what.clone(),
                format: "CSV",
                location: "the value".to_owned(),
                message: e.to_string(),
            },
        }
    }
}

impl MemberSource for ConfigMapMembers {
    fn describe(&self) -> String {
        self.what.clone()
    }

    fn members(&self) -> MemberStream<'_> {
        match self.format {
            ConfigMapFormat::Lines => Box::pin(stream::iter(self.line_batches())),
            ConfigMapFormat::Csv => Box::pin(async_stream::try_stream! {
                // The whole value is in memory already (a ConfigMap holds at most 1 MiB): no
                // row can be longer than it.
                let whole = self.data.len() as u64;
                let mut rows = CsvRows::new(self.data.as_slice(), &self.fields, whole).await.map_err(|e| self.format_error(e))?;
                while let Some(batch) = rows.next_batch(&self.fields, BATCH_ROWS).await.map_err(|e| self.format_error(e))? {
                    yield batch;
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IdentifierMapping;
    use crate::domain::member::Member;
    use crate::source::{InMemoryObjects, read_cohort};

    fn spec(format: ConfigMapFormat, column: &str) -> ConfigMapSource {
        ConfigMapSource { name: "cohort".into(), key: "ids".into(), format, column: column.into() }
    }

    fn ext(field: &str) -> IdentifierFields {
        IdentifierFields::from_mapping(&IdentifierMapping { external_id: Some(field.into()), ..Default::default() })
            .unwrap()
    }

    #[tokio::test]
    async fn lines_are_trimmed_and_blank_lines_counted() {
        let objects = InMemoryObjects::new("ns").with_config_map("cohort", "ids", "  u1\r\nu2\n\nu1\n\u{0}x\n");
        let source = ConfigMapMembers::open(&spec(ConfigMapFormat::Lines, "id"), ext("id"), &objects).await.unwrap();
        let read = read_cohort(&source).await.unwrap();
        let members: Vec<_> = read.members.iter().map(|k| k.member().unwrap()).collect();
        assert_eq!(members, vec![Member::ExternalId("u1".into()), Member::ExternalId("u2".into())]);
        assert_eq!(read.duplicates, 1);
        assert_eq!(read.skipped.get(SkipReason::Missing), 1);
        assert_eq!(read.skipped.get(SkipReason::ControlCharacter), 1);
        assert_eq!(read.rows, 5);
        assert_eq!(source.describe(), "ConfigMap ns/cohort key ids");
    }

    #[tokio::test]
    async fn an_empty_value_is_an_empty_list() {
        let objects = InMemoryObjects::new("ns").with_config_map("cohort", "ids", "");
        let source = ConfigMapMembers::open(&spec(ConfigMapFormat::Lines, "id"), ext("id"), &objects).await.unwrap();
        assert_eq!(read_cohort(&source).await.unwrap().rows, 0);
    }

    #[tokio::test]
    async fn a_lines_column_the_mapping_does_not_read_is_refused() {
        let objects = InMemoryObjects::new("ns").with_config_map("cohort", "ids", "u1\n");
        let err = ConfigMapMembers::open(&spec(ConfigMapFormat::Lines, "id"), ext("uid"), &objects).await.unwrap_err();
        assert_eq!(err.reason(), "InvalidSpec");
        assert!(err.to_string().contains("\"id\""), "{err}");
    }

    #[tokio::test]
    async fn csv_errors_name_the_config_map_and_line() {
        let objects = InMemoryObjects::new("ns").with_config_map("cohort", "ids", "uid,x\n1,2\n3\n");
        let source = ConfigMapMembers::open(&spec(ConfigMapFormat::Csv, "id"), ext("uid"), &objects).await.unwrap();
        let err = read_cohort(&source).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "ConfigMap ns/cohort key ids: malformed CSV at line 3: 1 fields where the header has 2"
        );
    }

    #[tokio::test]
    async fn a_missing_config_map_is_named() {
        let objects = InMemoryObjects::new("ns");
        let err = ConfigMapMembers::open(&spec(ConfigMapFormat::Csv, "id"), ext("uid"), &objects).await.unwrap_err();
        assert_eq!(err.reason(), "ConfigMapNotFound");
        assert!(err.to_string().starts_with("ConfigMap ns/cohort not found"), "{err}");
    }
}
