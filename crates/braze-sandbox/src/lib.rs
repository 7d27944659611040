//! A local Braze for the partner cohort import endpoints.
