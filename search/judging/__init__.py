"""The stages that judge trials: racing over paired seeds, confirmation on fresh seeds, the study's
reports, and the champion in the Model Registry."""
